"""`vlbert-prep train-detector`: train a detector on the embedded default's scenes and measure it.

`--arch bua-resnet18` (or -34/-50/-101) trains our bottom-up-attention detector with that body;
any other name is a torchvision detection model.

The default scenes (`vlbert-prep default`) carry exact boxes and classes (6 colours x 4 shapes, class
0 = background), so a detector trained on `vl/train` can be measured on `vl/val` the way region
extraction uses it: the same detector class and the same 10-100 box rule as `vlbert-prep regions`.
Reported, for the trained detector and for the same architecture untrained:

* recall: the share of true objects that some kept box covers at IoU >= 0.5;
* class accuracy: for each covered object, whether the best-overlapping kept box's most likely
  class (background excluded) is the object's class.

No pretrained backbone exists offline, so the body trains from scratch. Our body's BatchNorms are
frozen (as a pretrained ResNet's must be); for training from scratch they are swapped for ordinary
BatchNorm layers and folded back into frozen statistics when training ends, so the file is the same
architecture that extraction and the end-to-end front end load.

Weights: `bua-*` as a `.safetensors` file with the architecture in its metadata (`--detector
bua:WEIGHTS`); torchvision models with `torch.save(state_dict)` (`--detector
torchvision:ARCH:WEIGHTS`). The figures go to JSON next to them.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlbert_ds.data import storage


@dataclass
class Scene:
    image: torch.Tensor  # uint8 [3, H, W]
    boxes: torch.Tensor  # float32 [K, 4]
    labels: torch.Tensor  # int64 [K], 1..C-1


def read_scenes(spec: str, limit: int | None = None) -> list[Scene]:
    """Scenes of a default-data folder (`.../vl/train`): image, boxes, and the class of each box (the
    argmax of its class distribution, which the generator puts on the true class)."""
    from PIL import Image

    scenes: list[Scene] = []
    for url in storage.expand_urls(spec):
        with storage.open_with_retries(url) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            sample: dict[str, bytes] = {}
            key = None
            for member in tar:
                name = member.name
                stem, _, suffix = name.partition(".")
                if key is not None and stem != key:
                    scenes.append(_scene(sample, Image))
                    sample = {}
                key = stem
                sample[suffix] = tar.extractfile(member).read()
                if limit is not None and len(scenes) >= limit:
                    return scenes
            if sample:
                scenes.append(_scene(sample, Image))
        if limit is not None and len(scenes) >= limit:
            return scenes[:limit]
    if not scenes:
        raise ValueError(f"{spec}: no scenes (expected the vl/train or vl/val folder of `vlbert-prep default`)")
    return scenes


def _scene(sample: dict[str, bytes], image_module) -> Scene:
    if not {"jpg", "boxes.npy", "scores.npy"} <= set(sample):
        raise ValueError("a sample without jpg/boxes/scores: train-detector reads `vlbert-prep default` data")
    pixels = np.asarray(image_module.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.uint8)
    boxes = np.load(io.BytesIO(sample["boxes.npy"]), allow_pickle=False).astype(np.float32)
    scores = np.load(io.BytesIO(sample["scores.npy"]), allow_pickle=False).astype(np.float32)
    return Scene(torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(), torch.from_numpy(boxes),
                 torch.from_numpy(scores.argmax(1)).long())


BUA_PREFIX = "bua-"


def bua_spec_for_scenes(arch: str, num_classes: int, min_size: int, max_size: int):
    """The small bottom-up-attention detector for the default scenes: its body, anchors for 40-80 pixel
    objects (32, 64 and 128 pixels a side at three ratios), a 7x7 RoI grid (4x cheaper than 14x14)."""
    from vlbert_ds.model.detector import BUA_BLOCKS, BUASpec

    backbone = arch.removeprefix(BUA_PREFIX)
    if backbone not in BUA_BLOCKS:
        raise ValueError(f"--arch {arch}: expected bua-{{{','.join(b.removeprefix('resnet') for b in BUA_BLOCKS)}}} "
                         "with 'resnet' as in bua-resnet18, or a torchvision detection model")
    return BUASpec(backbone=backbone, num_classes=num_classes, num_attributes=0, anchor_scales=(2.0, 4.0, 8.0),
                   roi_output_size=7, min_size=min_size, max_size=max_size, rpn_pre_nms=1000, rpn_post_nms=300,
                   rpn_train_pre_nms=2000, rpn_train_post_nms=600)


def swap_batchnorm(module: torch.nn.Module, trainable: bool) -> None:
    """Frozen BatchNorm <-> ordinary BatchNorm, statistics and affine carried over (see the docstring)."""
    from vlbert_ds.model.visual import FrozenBatchNorm

    for name, child in module.named_children():
        if trainable and isinstance(child, FrozenBatchNorm):
            norm = torch.nn.BatchNorm2d(child.weight.shape[0], eps=child.eps)
        elif not trainable and isinstance(child, torch.nn.BatchNorm2d):
            norm = FrozenBatchNorm(child.weight.shape[0], eps=child.eps)
        else:
            swap_batchnorm(child, trainable)
            continue
        with torch.no_grad():
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, key).copy_(getattr(child, key))
        setattr(module, name, norm)


def build_untrained(arch: str, num_classes: int, min_size: int, max_size: int) -> torch.nn.Module:
    from vlbert_ds.model.detector import BottomUpAttentionDetector, _torchvision_builder

    if arch.startswith(BUA_PREFIX):
        return BottomUpAttentionDetector(bua_spec_for_scenes(arch, num_classes, min_size, max_size))
    return _torchvision_builder(arch)(weights=None, weights_backbone=None, num_classes=num_classes,
                                      min_size=min_size, max_size=max_size)


def train(arch: str, scenes: list[Scene], num_classes: int, steps: int, batch_size: int = 4, lr: float = 1e-3,
          seed: int = 0, min_size: int = 240, max_size: int = 320) -> torch.nn.Module:
    """Train `arch` from scratch (no pretrained weights exist offline) with AdamW."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = build_untrained(arch, num_classes, min_size, max_size)
    bua = arch.startswith(BUA_PREFIX)
    if bua:
        swap_batchnorm(net, trainable=True)
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    progress = tqdm(range(steps), desc="train-detector", unit="step", disable=None)
    started, every = time.time(), max(1, steps // 20)
    for step in progress:
        batch = rng.sample(scenes, min(batch_size, len(scenes)))
        images = [s.image if bua else s.image.float() / 255.0 for s in batch]
        targets = [{"boxes": s.boxes, "labels": s.labels} for s in batch]
        losses = net(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if progress.disable and ((step + 1) % every == 0 or step + 1 == steps):  # a log, not a terminal
            print(f"train-detector: step {step + 1}/{steps}, loss {float(loss.detach()):.3f}, "
                  f"{(time.time() - started) / (step + 1):.2f} s/step", flush=True)
    progress.close()
    if bua:
        swap_batchnorm(net, trainable=False)
    return net.eval()


def evaluate(detector, scenes: list[Scene], batch_size: int = 8) -> dict[str, float]:
    """Recall at IoU >= 0.5 and class accuracy of the matched boxes, with the regions' own selection rule."""
    from torchvision.ops import box_iou

    objects = covered = right = kept = 0
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        for scene, regions in zip(chunk, detector([s.image for s in chunk]), strict=True):
            kept += regions.boxes.shape[0]
            objects += scene.boxes.shape[0]
            if regions.boxes.shape[0] == 0:
                continue
            iou = box_iou(scene.boxes, regions.boxes)  # [objects, kept]
            best, which = iou.max(1)
            hit = best >= 0.5
            covered += int(hit.sum())
            predicted = regions.scores[which, 1:].argmax(1) + 1
            right += int((hit & (predicted == scene.labels)).sum())
    return {"recall_iou50": covered / max(1, objects), "class_accuracy_of_matched": right / max(1, covered),
            "objects": objects, "images": len(scenes), "boxes_per_image": kept / max(1, len(scenes))}


def train_and_measure(data: str, arch: str, out: str, steps: int, batch_size: int, lr: float, train_images: int | None,
                      eval_images: int, seed: int = 0, min_size: int = 240, max_size: int = 320) -> dict:
    from vlbert_ds.model.detector import TorchvisionRegionDetector, build_bua_detector, save_detector

    bua = arch.startswith(BUA_PREFIX)
    if bua and not out.endswith(".safetensors"):
        raise ValueError(f"--out {out}: a bua-* detector is written as .safetensors (with its architecture)")
    if bua:
        bua_spec_for_scenes(arch, 2, min_size, max_size)  # refuse a wrong name before reading data
    meta = storage.read_json(storage.join(data, "classes.json"))
    if not meta or "num_classes" not in meta:
        raise ValueError(f"{data}: no classes.json (train-detector reads a `vlbert-prep default` folder)")
    num_classes = int(meta["num_classes"])
    train_scenes = read_scenes(storage.join(data, "vl/train"), train_images)
    val_scenes = read_scenes(storage.join(data, "vl/val"), eval_images)
    print(f"train-detector: {arch}, {len(train_scenes)} training scenes, {len(val_scenes)} held-out, "
          f"{num_classes} classes, {steps} steps of {batch_size}", flush=True)
    start = time.time()
    net = train(arch, train_scenes, num_classes, steps, batch_size, lr, seed, min_size, max_size)
    seconds = time.time() - start
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if bua:
        save_detector(net, out)
        untrained = build_untrained(arch, num_classes, min_size, max_size).eval()
        trained = build_bua_detector(out)
    else:
        torch.save(net.state_dict(), out)
        untrained = TorchvisionRegionDetector(arch, None, num_classes, min_size, max_size)
        trained = TorchvisionRegionDetector(arch, out, num_classes, min_size, max_size)
    report = {"arch": arch, "data": data, "detector": f"bua:{out}" if bua else f"torchvision:{arch}:{out}",
              "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_scenes": len(train_scenes), "train_seconds": round(seconds, 1), "weights": out,
              "held_out": {"trained": evaluate(trained, val_scenes), "untrained": evaluate(untrained, val_scenes)}}
    Path(out).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return report
