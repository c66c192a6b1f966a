"""Prep on inputs a user really has: phone photos with EXIF orientation, 16-bit/palette/CMYK/alpha images
(variants of scikit-image's bundled photographs), region files in the bottom-up-attention and LXMERT
layouts written from their public field lists, manifests edited between runs, and file mistakes.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlbert_ds.data.schema import decode_vl
from vlbert_ds.prep.cli import main as prep_main


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _samples(folder):
    """key -> (meta, decoded RGB pixels or None, boxes) over every shard of a prep output folder."""
    out = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        members = _members(shard)
        for name in members:
            if name.endswith(".json"):
                key = name[: -len(".json")]
                jpg = members.get(f"{key}.jpg")
                pixels = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")) if jpg else None
                boxes = np.load(io.BytesIO(members[f"{key}.boxes.npy"])) if f"{key}.boxes.npy" in members else None
                out[key] = (json.loads(members[name]), pixels, boxes)
    return out


def _skipped(folder):
    total = {}
    for stats in folder.glob("*_stats.json"):
        for reason, n in json.loads(stats.read_text())["skipped"].items():
            total[reason] = total.get(reason, 0) + n
    return total


def _b64(array, dtype=np.float32):
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


# ----------------------------------------------------------------------------- images
def test_exif_orientation_is_applied_before_boxes(tmp_path):
    """A phone portrait: stored landscape with Orientation=6; the manifest's box is on the portrait."""
    from skimage import data

    coffee = data.coffee()  # 400 high, 600 wide
    displayed = np.rot90(coffee, k=-1).copy()  # what a viewer shows for Orientation 6: 600 high, 400 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(coffee).save(tmp_path / "portrait.jpg", quality=95, exif=exif.tobytes())
    box = [50.0, 420.0, 350.0, 590.0]  # in the lower part of the portrait: y beyond the stored height 400
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "portrait.jpg", "caption": "a cup from above",
                                                  "boxes": [box]}) + "\n")
    out = tmp_path / "out"
    assert prep_main(["captions", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(out),
                      "--processes", "1"]) == 0
    assert _skipped(out) == {}
    (meta, pixels, boxes), = _samples(out).values()
    scale = 600 / 400  # short side 400 -> 600; long side 600 -> 900 <= 1000
    assert (meta["image_width"], meta["image_height"]) == (600, 900)
    assert np.allclose(boxes, np.array([box]) * scale, atol=1e-3)
    expected = np.asarray(Image.fromarray(displayed).resize((600, 900), Image.Resampling.BILINEAR), dtype=float)
    assert np.abs(pixels - expected).mean() < 6  # the displayed picture (JPEG noise only)


def _modes(folder):
    """Variants of real photographs in each mode Pillow opens, and the RGB each should become."""
    from skimage import data

    camera, chelsea = data.camera(), data.chelsea()
    expected = {}
    Image.fromarray(camera.astype(np.uint16) * 257).save(folder / "gray16.png")  # 16-bit grayscale PNG
    expected["gray16.png"] = np.repeat(camera[..., None], 3, axis=2)
    rgb48 = chelsea.astype(np.uint16) * 257
    # A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one): IHDR bit depth 16, colour 2.
    (folder / "rgb48.png").write_bytes(_png16(rgb48))
    expected["rgb48.png"] = chelsea
    Image.fromarray(chelsea).quantize(colors=256).save(folder / "palette.png")
    expected["palette.png"] = chelsea
    Image.fromarray(chelsea).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = chelsea
    Image.fromarray(camera).save(folder / "gray.png")
    expected["gray.png"] = np.repeat(camera[..., None], 3, axis=2)
    rgba = np.dstack([chelsea, np.full(chelsea.shape[:2], 255, np.uint8)])
    rgba[:, : chelsea.shape[1] // 2, 3] = 0  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    composed = chelsea.copy()
    composed[:, : chelsea.shape[1] // 2] = 255  # on white
    expected["alpha.png"] = composed
    la = np.dstack([camera, np.where(np.arange(camera.shape[1]) < 256, 0, 255).astype(np.uint8)[None, :]
                    .repeat(camera.shape[0], 0)])
    Image.fromarray(la, "LA").save(folder / "gray_alpha.png")
    gray = np.repeat(camera[..., None], 3, axis=2).copy()
    gray[:, :256] = 255
    expected["gray_alpha.png"] = gray
    return expected


def _png16(rgb16: np.ndarray) -> bytes:
    import struct
    import zlib

    height, width, _ = rgb16.shape
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_every_image_mode_becomes_the_right_rgb(tmp_path):
    expected = _modes(tmp_path)
    rows = [{"image": name, "caption": f"picture {i}"} for i, name in enumerate(expected)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    # Short side kept at its size so pixels compare one to one (camera 512, chelsea 300).
    assert prep_main(["captions", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(out), "--processes", "1",
                      "--short-side", "300", "--max-long-side", "451"]) == 0
    assert _skipped(out) == {}
    by_image = {meta["source"]["image"]: pixels for meta, pixels, _ in _samples(out).values()}
    for name, want in expected.items():
        got = by_image[name]
        if got.shape != want.shape:  # camera (512x512) was scaled to 300: compare at that size
            want = np.asarray(Image.fromarray(want).resize(got.shape[1::-1], Image.Resampling.BILINEAR))
        error = np.abs(got.astype(float) - want.astype(float)).mean()
        assert error < 8, (name, error)  # JPEG (and palette quantisation) noise; a white 16-bit image is ~150


# ----------------------------------------------------------------------------- URLs that reach local files
def test_local_filesystem_urls_are_refused_unless_allowed(tmp_path):
    from skimage import data

    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    Image.fromarray(data.chelsea()).save(secret)
    images = tmp_path / "images"
    images.mkdir()
    references = [f"file://{secret}", f"simplecache::file://{secret}", f"local://{secret}", str(secret),
                  "~/secret.png", f"zip://secret.png::file://{tmp_path}/x.zip"]
    manifest = images / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": r, "caption": "a cat"}) for r in references) + "\n")
    out = tmp_path / "refused"
    assert prep_main(["captions", "--manifest", str(manifest), "--out", str(out), "--processes", "1"]) == 1
    assert _skipped(out) == {"unsafe_path": len(references)}
    allowed = tmp_path / "allowed"
    assert prep_main(["captions", "--manifest", str(manifest), "--out", str(allowed), "--processes", "1",
                      "--allow-local-urls"]) == 0
    assert len(_samples(allowed)) == 4  # file://, simplecache::file://, local://, the absolute path
    assert set(_skipped(allowed)) <= {"missing_file", "unreadable_file"}


# ----------------------------------------------------------------------------- resume
def _manifest(folder, captions):
    from skimage import data

    Image.fromarray(data.chelsea()).save(folder / "cat.jpg")
    rows = [{"image": "cat.jpg", "caption": c} for c in captions]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder / "m.jsonl"


def _captions(folder):
    return sorted(meta["caption"] for meta, _, _ in _samples(folder).values())


def test_rows_inserted_into_a_manifest_are_never_mixed_with_old_shards(tmp_path):
    first = [f"a cat number {i}" for i in range(12)]
    manifest = _manifest(tmp_path, first)
    out = tmp_path / "out"
    args = ["captions", "--manifest", str(manifest), "--out", str(out), "--samples-per-shard", "5",
            "--processes", "1", "--short-side", "60", "--max-long-side", "100"]
    assert prep_main(args) == 0
    assert _captions(out) == sorted(first)
    inserted = [f"a new cat {i}" for i in range(5)] + first
    _manifest(tmp_path, inserted)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert prep_main(args) == 2  # refused: finished shards were made from other rows
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    assert prep_main([*args, "--overwrite"]) == 0
    assert _captions(out) == sorted(inserted)  # every row once, no duplicate, none lost
    shorter = first[:4]
    _manifest(tmp_path, shorter)
    assert prep_main(args) == 2  # shards 1..3 would be left over from the longer input
    assert prep_main([*args, "--overwrite"]) == 0
    assert _captions(out) == sorted(shorter) and sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]
    # Another option that shapes the output (image size) is a different input too.
    assert prep_main([*args[:-1], "120"]) == 2
    # The same input again: resumed, nothing rewritten.
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert prep_main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == stamp


def test_skipped_log_lists_every_skipped_row_with_its_reason(tmp_path):
    manifest = _manifest(tmp_path, ["a cat", "  ", "a cat again"])
    with open(manifest, "a") as handle:
        handle.write("{broken\n" + json.dumps({"image": "nope.jpg", "caption": "gone"}) + "\n")
    log = tmp_path / "skipped.jsonl"
    assert prep_main(["captions", "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--processes", "1",
                      "--samples-per-shard", "2", "--skipped-log", str(log), "--short-side", "60"]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rows] == [(1, "empty_caption"), (3, "malformed_row"),
                                                       (4, "missing_file")]
    assert rows[2]["input"]["image"] == "nope.jpg" and "line 4" in rows[1]["detail"]


# ----------------------------------------------------------------------------- region files
def _bua_row(image_id, width, height, boxes, features, scores=None):
    fields = [image_id, str(width), str(height), str(len(boxes)), _b64(boxes), _b64(features)]
    return "\t".join(fields + ([_b64(scores)] if scores is not None else []))


def _lxmert_row(image_id, width, height, objects, conf, boxes, features):
    n = len(boxes)
    return "\t".join([image_id, str(height), str(width), _b64(objects, np.int64), _b64(conf),
                      _b64(np.zeros(n), np.int64), _b64(np.full(n, 0.3)), str(n), _b64(boxes), _b64(features)])


def _region_data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    boxes = np.column_stack([rng.uniform(0, 40, n), rng.uniform(0, 40, n), rng.uniform(50, 99, n),
                             rng.uniform(50, 99, n)])
    return boxes, rng.normal(size=(n, 2048)).astype(np.float32)


def _precomputed_prep(tmp_path, regions, name, extra=()):
    manifest = tmp_path / f"{name}.jsonl"
    manifest.write_text("\n".join(json.dumps({"image_id": i, "caption": f"a photo number {i}"})
                                  for i in ("img1", "img2")) + "\n")
    out = tmp_path / f"out-{name}"
    code = prep_main(["captions", "--manifest", str(manifest), "--regions", regions, "--no-images", "--out",
                      str(out), "--processes", "1", *extra])
    return code, out


def test_generate_tsv_names_gzip_and_the_lxmert_layout_are_read(tmp_path, capsys):
    boxes, features = _region_data()
    scores = np.zeros((12, 1601), np.float32)
    scores[np.arange(12), 1 + np.arange(12)] = np.linspace(0.95, 0.3, 12)
    scores[:, 0] = 1 - scores[:, 1:].sum(1)
    bua = "\n".join(_bua_row(i, 100, 100, boxes, features, scores) for i in ("img1", "img2")) + "\n"
    (tmp_path / "feats.tsv.0").write_text(bua)  # the name generate_tsv.py gives its per-GPU output
    with gzip.open(tmp_path / "feats.tsv.gz", "wt") as handle:
        handle.write(bua)
    objects = np.arange(12) * 100  # VG object ids 0..1599
    conf = np.linspace(0.95, 0.3, 12).astype(np.float32)
    (tmp_path / "lxmert.tsv").write_text("\n".join(_lxmert_row(i, 100, 100, objects, conf, boxes, features)
                                                   for i in ("img1", "img2")) + "\n")
    for name in ("feats.tsv.0", "feats.tsv.gz", "lxmert.tsv"):
        code, out = _precomputed_prep(tmp_path, str(tmp_path / name), name.replace(".", "_"))
        assert code == 0, capsys.readouterr().err
        assert _skipped(out) == {}
        samples = _samples(out)
        assert len(samples) == 2
        members = _members(out / "shard-000000.tar")
        sample = {k.split(".", 1)[1]: v for k, v in members.items() if k.startswith("000000_000000.")}
        record = decode_vl(sample, need_features=False, need_image=False)
        assert record.class_ids.shape == (10, 32)  # format 2 default: the top 32 of 1601 classes
        stored = record.dense_scores()
        stored_boxes = np.load(io.BytesIO(members["000000_000000.boxes.npy"]))
        # conf >= 0.5 for the first 8 boxes of 12 -> the 10-box minimum, sorted by confidence
        assert stored.shape == (10, 1601) and np.allclose(stored_boxes, boxes[:10], atol=1e-3)
        if name == "lxmert.tsv":  # soft label rebuilt: conf on objects_id + 1, the rest on background
            assert np.allclose(stored[np.arange(10), objects[:10] + 1], conf[:10], atol=1e-3)
            assert np.allclose(stored[:, 0], 1 - conf[:10], atol=1e-3) and np.allclose(stored.sum(1), 1, atol=1e-2)
        else:
            assert np.allclose(stored, scores[:10], atol=1e-3)
    assert "lxmert TSV" in capsys.readouterr().out


def test_region_files_we_cannot_read_name_the_file_and_the_layouts(tmp_path, capsys):
    boxes, features = _region_data()
    (tmp_path / "nine.tsv").write_text("\t".join(["img1"] * 9) + "\n")
    code, out = _precomputed_prep(tmp_path, str(tmp_path / "nine.tsv"), "nine")
    err = capsys.readouterr().err
    assert code == 2 and "nine.tsv row 1" in err and "LXMERT (img_id, img_h" in err and "bottom-up-attention" in err
    assert not out.exists()
    row = _bua_row("img1", 100, 100, boxes, features).split("\t")
    row[3] = "twelve"
    (tmp_path / "badnum.tsv").write_text("\t".join(row) + "\n")
    code, _ = _precomputed_prep(tmp_path, str(tmp_path / "badnum.tsv"), "badnum")
    err = capsys.readouterr().err
    assert code == 2 and "badnum.tsv row 1" in err


# ----------------------------------------------------------------------------- messages
def test_missing_inputs_name_the_flag_and_create_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert prep_main(["captions", "--manifest", str(tmp_path / "cc.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--manifest" in err and "cc.jsonl: no such file" in err and "cannot write" not in err
    assert not out.exists()
    (tmp_path / "train.jsonl").write_text("{}\n")
    assert prep_main(["vcr", "--annotations", str(tmp_path / "train.jsonl"), "--metadata-root",
                      str(tmp_path / "vcr1images"), "--regions", str(tmp_path), "--out", str(out)]) == 2
    assert "--metadata-root" in capsys.readouterr().err and not out.exists()


def test_a_headerless_tsv_manifest_is_refused(tmp_path, capsys):
    (tmp_path / "m.tsv").write_text("cat.jpg\ta cat on a mat\ndog.jpg\ta dog\n")
    assert prep_main(["captions", "--manifest", str(tmp_path / "m.tsv"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "m.tsv" in err and "header" in err and "'caption'" in err


def test_a_tsv_row_with_the_wrong_field_count_is_malformed(tmp_path):
    _manifest(tmp_path, ["x"])
    (tmp_path / "m.tsv").write_text("image\tcaption\ncat.jpg\ta cat\ncat.jpg\ta cat\textra\n")
    out = tmp_path / "o"
    assert prep_main(["captions", "--manifest", str(tmp_path / "m.tsv"), "--out", str(out), "--processes", "1",
                      "--short-side", "60"]) == 0
    assert _skipped(out) == {"malformed_row": 1}


def test_refcoco_pickle_is_refused_with_the_conversion(tmp_path, capsys):
    import pickle

    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1}], protocol=2))
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    assert prep_main(["refcoco", "--refs", str(tmp_path / "refs(unc).p"), "--instances",
                      str(tmp_path / "instances.json"), "--split", "train", "--regions", str(tmp_path),
                      "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "json.dump(pickle.load(" in err and "UnicodeDecodeError" not in err


def test_an_empty_vqa_vocabulary_is_an_error(tmp_path, capsys):
    questions = {"questions": [{"question_id": i, "image_id": 1, "question": "what?"} for i in range(3)]}
    annotations = {"annotations": [{"question_id": i, "image_id": 1, "multiple_choice_answer": "yes",
                                    "answers": [{"answer": "yes", "answer_id": k} for k in range(1, 11)]}
                                   for i in range(3)]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    boxes, features = _region_data()
    (tmp_path / "r.tsv").write_text(_bua_row("1", 100, 100, boxes, features) + "\n")
    out = tmp_path / "vqa"
    assert prep_main(["vqa", "--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                      "--regions", str(tmp_path / "r.tsv"), "--out", str(out), "--build-vocabulary"]) == 2
    err = capsys.readouterr().err
    assert "--min-answer-count=9" in err and "'yes', is given 3 times" in err
    assert not (out / "answers.json").exists()
    assert prep_main(["vqa", "--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                      "--regions", str(tmp_path / "r.tsv"), "--out", str(out), "--build-vocabulary",
                      "--min-answer-count", "1", "--processes", "1"]) == 0
    assert json.loads((out / "answers.json").read_text()) == ["yes"]


@pytest.fixture(autouse=True)
def _no_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
