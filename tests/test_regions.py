"""`vlbert-prep regions` with the torchvision backend, on real photographs, weights the test writes
(torchvision's own architecture, random init; nothing is downloaded), then `captions --regions DIR`."""

from __future__ import annotations

import base64
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import SMALL_TORCHVISION_DETECTOR
from PIL import Image

from vlbert_ds.model.detector import select_regions
from vlbert_ds.prep.cli import main as prep_main

ARCH = SMALL_TORCHVISION_DETECTOR  # quick on CPU
SIZES = ["--min-size", "240", "--max-size", "400"]


@pytest.fixture(scope="module")
def weights(torchvision_detector_weights):
    return torchvision_detector_weights


@pytest.fixture()
def photos(tmp_path):
    from skimage import data

    for name in ("chelsea", "coffee", "astronaut", "camera"):
        Image.fromarray(getattr(data, name)()).save(tmp_path / f"{name}.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(data.coffee()).save(tmp_path / "portrait.jpg", exif=exif.tobytes())
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    rows = [{"image": "chelsea.png", "caption": "a cat", "image_id": "cat"},
            {"image": "coffee.png", "caption": "a cup of coffee"},
            {"image": "astronaut.png", "caption": "an astronaut", "image_id": "astro"},
            {"image": "broken.jpg", "caption": "nothing", "image_id": "broken"},
            {"image": "camera.png", "caption": "a man with a camera", "image_id": "camera"},
            {"image": "missing.jpg", "caption": "gone", "image_id": "missing"},
            {"image": "portrait.jpg", "caption": "a cup from above", "image_id": "portrait"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def _rows(folder):
    out = {}
    for path in sorted(folder.glob("regions-*.tsv")):
        for line in path.read_text().splitlines():
            f = line.split("\t")
            n = int(f[3])
            arrays = [np.frombuffer(base64.b64decode(x), np.float32).reshape(n, -1) for x in f[4:7]]
            out[f[0]] = (int(f[1]), int(f[2]), *arrays)
    return out


def test_select_regions_follows_generate_tsv():
    """Per-class NMS at 0.3, best surviving class score, >= 0.5, 10..100 by confidence; computed by hand."""
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10.5]], dtype=torch.float32)
    scores = torch.tensor([[0.1, 0.8, 0.1], [0.0, 0.9, 0.1], [0.3, 0.1, 0.6], [0.2, 0.2, 0.6]])
    # class 1: box1 (0.9) suppresses box0 and box3 (IoU > 0.3); box2 survives with 0.1
    # class 2: box2 (0.6) and box3 (0.6) survive (no overlap); box0, box1 suppressed by box3 (0.6 > 0.1)
    # max_conf = [0, 0.9, 0.6, 0.6]
    keep, conf = select_regions(boxes, scores, min_boxes=1)
    assert keep.tolist() == [1, 2, 3] and torch.allclose(conf, torch.tensor([0.9, 0.6, 0.6]))
    keep, _ = select_regions(boxes, scores, min_boxes=4)  # fewer pass: the best 4 by confidence
    assert keep.tolist() == [1, 2, 3, 0]
    keep, _ = select_regions(boxes, scores, min_boxes=1, max_boxes=2)
    assert keep.tolist() == [1, 2]


def test_regions_from_photos_then_caption_shards(photos, weights, tmp_path, capsys):
    out = tmp_path / "regions"
    args = ["regions", "--manifest", str(photos / "m.jsonl"), "--detector", f"torchvision:{ARCH}:{weights}",
            "--out", str(out), "--images-per-file", "3", "--batch-size", "2", *SIZES]
    assert prep_main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "unreadable_image" in printed and "missing_file" in printed
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("regions-*_stats.json"))]
    assert [s["rows"] for s in stats] == [3, 3, 1] and sum(s["images"] for s in stats) == 5
    rows = _rows(out)
    assert sorted(rows) == ["astro", "camera", "cat", "coffee.png", "portrait"]  # no image_id: keyed by image
    assert (rows["portrait"][0], rows["portrait"][1]) == (400, 600)  # EXIF applied: portrait
    for key, (width, height, boxes, features, scores) in rows.items():
        assert 10 <= boxes.shape[0] <= 100, key
        assert features.shape == (boxes.shape[0], 1024) and scores.shape == (boxes.shape[0], 91)
        assert np.allclose(scores.sum(1), 1, atol=1e-4)
        assert (boxes[:, [0, 2]] <= width - 1 + 1e-3).all() and (boxes[:, [1, 3]] <= height - 1 + 1e-3).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    # The features are the box head's output for exactly these boxes: recomputed here from torchvision.
    import torchvision
    from skimage import data

    net = getattr(torchvision.models.detection, ARCH)(weights=None, weights_backbone=None, num_classes=91,
                                                      min_size=240, max_size=400).eval()
    net.load_state_dict(torch.load(weights, weights_only=True))
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        batch, _ = net.transform([image])
        maps = net.backbone(batch.tensors)
        size = batch.image_sizes[0]
        width, height, boxes, features, scores = rows["cat"]
        scale = torch.tensor([size[1] / width, size[0] / height] * 2)
        pooled = net.roi_heads.box_roi_pool(maps, [torch.from_numpy(boxes.copy()) * scale], batch.image_sizes)
        expected = net.roi_heads.box_head(pooled)
        logits, _ = net.roi_heads.box_predictor(expected)
    # boxes at the image border were clipped to the last pixel, so compare the unclipped ones tightly
    inside = torch.from_numpy((boxes[:, 2] < width - 1) & (boxes[:, 3] < height - 1))
    assert inside.sum() >= 3
    assert torch.allclose(expected[inside], torch.from_numpy(features)[inside], atol=1e-3)
    assert torch.allclose(torch.softmax(logits, -1)[inside], torch.from_numpy(scores)[inside], atol=1e-4)

    # Re-running does nothing; another input size is another input.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prep_main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert prep_main([*args[:-4], "--min-size", "200", "--max-size", "400"]) == 2
    assert "--overwrite" in capsys.readouterr().err

    # The region folder feeds `vlbert-prep captions --regions DIR` (precomputed shards).
    shards = tmp_path / "shards"
    assert prep_main(["captions", "--manifest", str(photos / "m.jsonl"), "--regions", str(out), "--no-images",
                      "--out", str(shards), "--processes", "1"]) == 0
    with tarfile.open(shards / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert len(metas) == 5
    feats = np.load(io.BytesIO(members["000000_000000.features.npy"]))
    assert feats.shape[1] == 1024 and feats.shape[0] >= 10


def test_bad_detector_specs_and_weights_are_refused_clearly(photos, weights, tmp_path, capsys):
    base = ["regions", "--manifest", str(photos / "m.jsonl"), "--out", str(tmp_path / "r"), *SIZES]
    assert prep_main([*base, "--detector", "yolo:x"]) == 2
    assert "torchvision:ARCH:WEIGHTS" in capsys.readouterr().err
    assert prep_main([*base, "--detector", "torchvision:no_such_model:" + str(weights)]) == 2
    assert "fasterrcnn_resnet50_fpn_v2" in capsys.readouterr().err
    assert prep_main([*base, "--detector", f"torchvision:{ARCH}:{tmp_path / 'nope.pth'}"]) == 2
    assert "not found" in capsys.readouterr().err
    # weights of another architecture: the missing/unexpected names are listed
    assert prep_main([*base, "--detector", f"torchvision:fasterrcnn_resnet50_fpn:{weights}"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "missing" in err and "unexpected" in err
    # a truncated weights file is corrupt, not unsafe
    cut = tmp_path / "cut.pth"
    cut.write_bytes(weights.read_bytes()[:5000])
    assert prep_main([*base, "--detector", f"torchvision:{ARCH}:{cut}"]) == 2
    assert "truncated" in capsys.readouterr().err
    assert prep_main([*base, "--detector", "bua:whatever.pkl"]) == 2
    assert "not found" in capsys.readouterr().err
    # torchvision weights given as a bottom-up-attention detector
    assert prep_main([*base, "--detector", f"bua:{weights}"]) == 2
    assert "not a bottom-up-attention detector" in capsys.readouterr().err


def test_detector_evaluation_counts_recall_and_class_accuracy_by_hand(default_data):
    """`evaluate` against scenes whose answers are known: a detector that returns the true boxes with the
    true classes scores 1.0 and 1.0; boxes shifted off their objects score 0 recall."""
    from vlbert_ds.model.detector import ImageRegions
    from vlbert_ds.prep.train_detector import evaluate, read_scenes

    scenes = read_scenes(str(default_data / "vl/val"), limit=12)
    assert len(scenes) == 12 and all(s.labels.min() >= 1 and s.labels.max() <= 24 for s in scenes)

    def oracle(shift: float, wrong_class: bool):
        def detect(images):
            found = []
            for image in images:
                scene = next(s for s in scenes if s.image is image)
                scores = torch.zeros(scene.boxes.shape[0], 25)
                labels = scene.labels % 24 + 1 if wrong_class else scene.labels
                scores[torch.arange(scene.boxes.shape[0]), labels] = 1.0
                found.append(ImageRegions(scene.boxes + shift, torch.zeros(len(labels), 8), scores,
                                          torch.ones(len(labels))))
            return found
        return detect

    objects = sum(s.boxes.shape[0] for s in scenes)
    perfect = evaluate(oracle(0.0, False), scenes, batch_size=5)
    assert perfect["objects"] == objects and perfect["recall_iou50"] == 1.0
    assert perfect["class_accuracy_of_matched"] == 1.0
    assert evaluate(oracle(0.0, True), scenes)["class_accuracy_of_matched"] == 0.0
    assert evaluate(oracle(1000.0, False), scenes)["recall_iou50"] == 0.0


def test_train_detector_command_writes_weights_that_regions_can_use(default_data, tmp_path, capsys):
    out = tmp_path / "det" / "frcnn.pth"
    assert prep_main(["train-detector", "--data", str(default_data), "--arch", ARCH, "--out", str(out),
                      "--steps", "2", "--batch-size", "2", "--train-images", "8", "--eval-images", "4"]) == 0
    printed = capsys.readouterr().out
    assert "trained" in printed and "untrained" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["held_out"]["trained"]["images"] == 4 and report["steps"] == 2
    from vlbert_ds.model.detector import TorchvisionRegionDetector

    assert TorchvisionRegionDetector(ARCH, str(out), min_size=240, max_size=320).num_classes == 25
