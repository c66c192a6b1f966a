"""vlbert-prep: manifests with real images, region importers, bad rows counted, resumable shards."""

from __future__ import annotations

import base64
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlbert_ds.data import storage
from vlbert_ds.prep.cli import main as prep_main
from vlbert_ds.prep.regions import Regions, parse_bua_row, parse_frcnn_json, select_boxes


def _b64(array) -> str:
    return base64.b64encode(np.asarray(array, dtype=np.float32).tobytes()).decode()


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture()
def image_folder(tmp_path):
    from skimage import data

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg")
    (folder / "broken.jpg").write_bytes(b"<html>not an image</html>")
    Image.new("RGB", (5, 300)).save(folder / "tiny.png")
    return folder


def test_captions_manifest_with_bad_rows(tmp_path, image_folder):
    rows = [
        {"image": "astronaut.jpg", "caption": "an astronaut holding a flag", "boxes": [[10, 20, 200, 300]]},
        {"image": "coffee.jpg", "caption": "a cup of coffee on a table"},
        {"image": "chelsea.jpg", "caption": "a cat looking to the side", "boxes": [[0, 0, 451, 300]]},
        {"image": "missing.jpg", "caption": "nothing here"},
        {"image": "broken.jpg", "caption": "an html page saved as jpg"},
        {"image": "tiny.png", "caption": "a sliver"},
        {"image": "coffee.jpg", "caption": "   "},
        {"image": "astronaut.jpg", "caption": "boxes past the edge", "boxes": [[10, 10, 900, 40]]},
        {"image": "/etc/passwd", "caption": "absolute path"},
        {"image": "../images/coffee.jpg", "caption": "parent path"},
    ]
    manifest = image_folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    out = tmp_path / "shards"
    code = prep_main(["captions", "--manifest", str(manifest), "--out", str(out), "--samples-per-shard", "4",
                      "--processes", "2"])
    assert code == 0
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    skipped = {}
    for s in stats:
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    # "not json" is a broken line, not an empty caption
    assert skipped == {"missing_file": 1, "unreadable_image": 1, "image_too_small": 1, "empty_caption": 1,
                       "malformed_row": 1, "boxes_out_of_range": 1, "unsafe_path": 2}
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 3, "shard-000001.tar": 0,
                                                             "shard-000002.tar": 0}
    members = _members(out / "shard-000000.tar")
    meta = json.loads(members["000000_000000.json"])
    # astronaut 512x512 -> short side 600; the box scales with it
    assert (meta["image_width"], meta["image_height"]) == (600, 600)
    boxes = np.load(__import__("io").BytesIO(members["000000_000000.boxes.npy"]))
    assert np.allclose(boxes, np.array([[10, 20, 200, 300]]) * 600 / 512, atol=1e-3)
    meta = json.loads(members["000000_000001.json"])
    assert (meta["image_width"], meta["image_height"]) == (900, 600)  # coffee: 600 wide, 400 high
    chelsea = json.loads(members["000000_000002.json"])
    assert (chelsea["image_width"], chelsea["image_height"]) == (902, 600)  # 451x300 -> long side 902 <= 1000


def test_nothing_usable_exits_non_zero(tmp_path, image_folder):
    manifest = image_folder / "bad.jsonl"
    manifest.write_text(json.dumps({"image": "missing.jpg", "caption": "x"}) + "\n")
    assert prep_main(["captions", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--processes", "1"]) == 1


def test_unwritable_output_exits_2(tmp_path, image_folder):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    manifest = image_folder / "m.jsonl"
    manifest.write_text(json.dumps({"image": "coffee.jpg", "caption": "a cup"}) + "\n")
    assert prep_main(["captions", "--manifest", str(manifest), "--out", str(blocker / "sub"), "--processes", "1"]) == 2


def _scores(confidences, classes=1601):
    """Rows whose best non-background class has the given confidence."""
    rows = np.zeros((len(confidences), classes), dtype=np.float32)
    for i, c in enumerate(confidences):
        rows[i, 1 + i % (classes - 1)] = c
        rows[i, 0] = 1 - c
    return rows


def test_box_selection_rule():
    def regions(conf):
        n = len(conf)
        return Regions(100, 100, np.tile([0, 0, 5, 5], (n, 1)).astype(np.float32), np.zeros((n, 4)), _scores(conf))

    conf = np.linspace(0.99, 0.4, 15)  # steps of 0.042: 0.99 ... 0.526 are >= 0.5, i.e. 12 boxes
    kept = select_boxes(regions(conf))
    assert len(kept.boxes) == 12
    assert np.all(np.diff(kept.scores[:, 1:].max(1)) <= 0)  # sorted by confidence
    assert len(select_boxes(regions(np.linspace(0.6, 0.1, 15))).boxes) == 10  # at least 10
    assert len(select_boxes(regions(np.full(130, 0.9))).boxes) == 100  # at most 100


def test_region_importers_and_precomputed_shards(tmp_path):
    rng = np.random.default_rng(0)
    n = 12
    boxes = np.column_stack([rng.uniform(0, 50, n), rng.uniform(0, 50, n), rng.uniform(60, 99, n),
                             rng.uniform(60, 99, n)])
    feats = rng.normal(size=(n, 2048))
    scores = _scores(np.linspace(0.99, 0.4, n))
    tsv = tmp_path / "regions.tsv"
    bad_feats = feats.copy()
    bad_feats[3, 7] = np.nan
    lines = [
        "\t".join(["img1", "100", "100", str(n), _b64(boxes), _b64(feats), _b64(scores)]),
        "\t".join(["img2", "100", "100", str(n), _b64(boxes), _b64(bad_feats), _b64(scores)]),
    ]
    tsv.write_text("\n".join(lines) + "\n")
    image_id, parsed = parse_bua_row(lines[0].split("\t"))
    assert image_id == "img1" and parsed.features.shape == (n, 2048) and parsed.scores.shape == (n, 1601)
    frcnn = tmp_path / "frcnn"
    frcnn.mkdir()
    (frcnn / "img1.json").write_text(json.dumps({"image_id": "img1", "image_w": 100, "image_h": 100, "num_boxes": n,
                                                 "boxes": _b64(boxes), "classes": _b64(scores),
                                                 "features": _b64(feats)}))
    assert np.allclose(parse_frcnn_json((frcnn / "img1.json").read_text())[1].boxes, boxes)

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image_id": i, "caption": f"a photo number {i}"})
                                  for i in ("img1", "img2", "img3")) + "\n")
    for regions, name in ((str(tsv), "tsv"), (str(frcnn), "json")):
        out = tmp_path / f"out-{name}"
        assert prep_main(["captions", "--manifest", str(manifest), "--regions", regions, "--no-images",
                          "--out", str(out), "--processes", "1"]) == 0
        stats = json.loads((out / "shard-000000_stats.json").read_text())
        assert stats["successes"] == 1
        expected = {"nonfinite_features": 1, "missing_regions": 1} if name == "tsv" else {"missing_regions": 2}
        assert stats["skipped"] == expected
        members = _members(out / "shard-000000.tar")
        stored = np.load(__import__("io").BytesIO(members["000000_000000.features.npy"]))
        scale = np.load(__import__("io").BytesIO(members["000000_000000.feature_scale.npy"]))
        # format 2 default: int8 codes with a per-box scale; 8 boxes >= 0.5 -> min 10
        assert stored.dtype == np.int8 and stored.shape == (10, 2048) and scale.shape == (10,)


def test_resume_redoes_only_unfinished_shards(tmp_path, minilm_folder):
    out = tmp_path / "default"
    args = ["default", "--out", str(out), "--num-images", "40", "--num-val-images", "10", "--num-text-segments",
            "30", "--samples-per-shard", "10", "--processes", "1"]
    assert prep_main(args) == 0
    shard = out / "vl/train/shard-000002.tar"
    original = _members(shard)
    shard.write_bytes(shard.read_bytes()[:1000])  # a crash mid-shard: tar cut short, no stats marker
    (out / "vl/train/shard-000002_stats.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "vl/train").glob("*.tar")}
    assert prep_main(args) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "vl/train").glob("*.tar")}
    assert [k for k in after if after[k] != before[k]] == ["shard-000002.tar"]
    assert _members(shard) == original  # deterministic generation, same samples
    assert json.loads((out / "vl/train/sizes.json").read_text())["shard-000002.tar"] == 10


def test_text_segments_have_at_least_64_basic_tokens(tmp_path, tokenizer):
    corpus = tmp_path / "corpus.txt"
    from vlbert_ds.prep.default import english_paragraphs

    corpus.write_text("\n".join(english_paragraphs()[:200]) + "\n\n")
    out = tmp_path / "text"
    assert prep_main(["text", str(corpus), "--out", str(out), "--processes", "1"]) == 0
    members = _members(out / "shard-000000.tar")
    segments = [np.load(__import__("io").BytesIO(v)) for k, v in members.items() if k.endswith("tokens.npy")]
    assert len(segments) == 200
    for ids in segments[:50]:
        words = tokenizer.decode(ids.tolist()).split()
        assert len(ids) >= 64 and len(words) >= 40
    assert storage.read_json(str(out / "sizes.json")) == {"shard-000000.tar": 200}
