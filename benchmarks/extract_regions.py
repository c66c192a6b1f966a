"""Region extraction speed: images/s of `vlbert-prep regions`' detector at the official 600x1000 input,
with the share of time in the backbone, the RPN, the box head and the box selection (per-class NMS).

    .venv/bin/python benchmarks/extract_regions.py --arch fasterrcnn_resnet50_fpn_v2 --images 8 \
        --json benchmarks/results/extract_regions_cpu.json

    .venv/bin/python benchmarks/extract_regions.py --arch bua-resnet101 --arch fasterrcnn_resnet50_fpn_v2 ...

`bua-BACKBONE` is our bottom-up-attention detector with the released model's architecture (1601
classes, 401 attributes, 300 proposals, ROIPool 14x14); any other name a torchvision detection model.
Random weights (the speed does not depend on the values, except the selection's, which is measured
with the real 10-100 rule on the real proposals). Real photographs (scikit-image's bundled ones)
resized to 600 on the short side.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def photographs(count: int) -> list[torch.Tensor]:
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "immunohistochemistry"]
    images = []
    for index in range(count):
        array = getattr(data, names[index % len(names)])()
        image = Image.fromarray(array).convert("RGB")
        scale = 600 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        images.append(torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1).contiguous())
    return images


def measure_bua(arch: str, images: list[torch.Tensor], batch_size: int, device: torch.device) -> dict:
    from torchvision.models.detection.image_list import ImageList

    from vlbert_ds.model.detector import BottomUpAttentionDetector, BUASpec, select_regions
    from vlbert_ds.model.visual import calibrate_frozen_batchnorm

    torch.manual_seed(0)
    detector = BottomUpAttentionDetector(BUASpec(backbone=arch.removeprefix("bua-"))).eval()
    # Random weights, made to behave: BatchNorm statistics from a real image (activations of order 1)
    # and zero RPN box deltas (proposals = anchors), so the RPN keeps its 300 proposals as a trained
    # one does; the time per image does not depend on the values otherwise.
    calibrate_frozen_batchnorm(detector, lambda: detector.features_for_boxes(images[:1], [torch.zeros(1, 4)]))
    with torch.no_grad():
        detector.rpn.head.deltas.weight.zero_()
        detector.rpn.head.deltas.bias.zero_()
    detector = detector.to(device)
    parts = {"backbone": 0.0, "rpn": 0.0, "box_head": 0.0, "selection": 0.0}
    boxes_kept = 0
    start = _clock(device)
    with torch.inference_mode():
        for first in range(0, len(images), batch_size):
            chunk = [img.to(device) for img in images[first : first + batch_size]]
            t0 = _clock(device)
            batch, sizes, scales = detector.preprocess(chunk)
            feature_map = detector.body.feature_map(batch)
            t1 = _clock(device)
            detector.rpn.image_scales = scales
            proposals, _ = detector.rpn(ImageList(batch, sizes), {"0": feature_map})
            t2 = _clock(device)
            features = detector._describe(feature_map, proposals)
            logits = detector.cls_score(features)
            probabilities = torch.softmax(logits.float(), -1)
            if detector.attribute_head is not None:
                detector.attribute_head(features, logits)
            t3 = _clock(device)
            offset = 0
            for boxes, scale in zip(proposals, scales, strict=True):
                keep, _ = select_regions(boxes / scale, probabilities[offset : offset + boxes.shape[0]])
                offset += boxes.shape[0]
                boxes_kept += int(keep.numel())
            t4 = _clock(device)
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[name] += seconds
    total = _clock(device) - start
    return {"arch": arch, "images": len(images), "batch_size": batch_size, "device": str(device),
            "images_per_s": len(images) / total, "seconds": total, "boxes_per_image": boxes_kept / len(images),
            "share": {name: seconds / total for name, seconds in parts.items()},
            "classes": detector.num_classes, "feature_dim": detector.feature_dim}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(arch: str, images: list[torch.Tensor], batch_size: int, device: torch.device) -> dict:
    from vlbert_ds.model.detector import TorchvisionRegionDetector, select_regions

    if arch.startswith("bua-"):
        return measure_bua(arch, images, batch_size, device)

    torch.manual_seed(0)
    detector = TorchvisionRegionDetector(arch, None, min_size=600, max_size=1000).to(device)
    net = detector.net
    parts = {"backbone": 0.0, "rpn": 0.0, "box_head": 0.0, "selection": 0.0}
    boxes_kept = 0

    def clock() -> float:
        return _clock(device)

    start = clock()
    with torch.inference_mode():
        for first in range(0, len(images), batch_size):
            batch_images = [img.to(device).float() / 255 for img in images[first : first + batch_size]]
            t0 = clock()
            batch, _ = net.transform(batch_images)
            features = net.backbone(batch.tensors)
            t1 = clock()
            proposals, _ = net.rpn(batch, features)
            t2 = clock()
            heads = net.roi_heads
            representation = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
            logits, _ = heads.box_predictor(representation)
            probabilities = torch.softmax(logits.float(), -1)
            t3 = clock()
            offset = 0
            for boxes in proposals:
                keep, _ = select_regions(boxes, probabilities[offset : offset + boxes.shape[0]])
                offset += boxes.shape[0]
                boxes_kept += int(keep.numel())
            t4 = clock()
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[name] += seconds
    total = clock() - start
    return {"arch": arch, "images": len(images), "batch_size": batch_size, "device": str(device),
            "images_per_s": len(images) / total, "seconds": total, "boxes_per_image": boxes_kept / len(images),
            "share": {name: seconds / total for name, seconds in parts.items()},
            "classes": detector.num_classes, "feature_dim": detector.feature_dim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", default=None,
                        help="bua-resnet101 (ours) or torchvision detection model(s) "
                             "(default: bua-resnet101 and fasterrcnn_resnet50_fpn_v2)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="batches run first and not timed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    images = photographs(args.images)
    rows = []
    for arch in args.arch or ["bua-resnet101", "fasterrcnn_resnet50_fpn_v2"]:
        if args.warmup:
            measure(arch, images[: args.batch_size * args.warmup], args.batch_size, device)
        rows.append(measure(arch, images, args.batch_size, device))
    for row in rows:  # the peer comparison: each detector's speed over the first one's, same run
        row["speed_vs_first"] = row["images_per_s"] / rows[0]["images_per_s"]
    print(f"region extraction at 600 (short side) x <=1000, {args.images} photographs, batch {args.batch_size}, "
          f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{'detector':<42} {'images/s':>9} {'backbone':>9} {'rpn':>6} {'head':>6} {'select':>7} {'boxes':>6} "
          f"{'vs 1st':>7}")
    for row in rows:
        share = row["share"]
        name = f"bottom-up-attention {row['arch'][4:]}" if row["arch"].startswith("bua-") else \
            f"torchvision {row['arch']}"
        print(f"{name:<42} {row['images_per_s']:>9.2f} {share['backbone']:>9.0%} "
              f"{share['rpn']:>6.0%} {share['box_head']:>6.0%} {share['selection']:>7.0%} "
              f"{row['boxes_per_image']:>6.1f} {row['speed_vs_first']:>6.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                               "threads": torch.get_num_threads(), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
