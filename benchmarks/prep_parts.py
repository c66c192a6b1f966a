"""Preparation speed with 1 and 2 parts: images/s of `vlbert-prep captions --detector ... --no-images`
(regions, then shards) run as one process, and as two `--part I/2` processes side by side, then finalized.

    .venv/bin/python benchmarks/prep_parts.py --images 48 --json benchmarks/results/prep_parts_cpu.json

Real photographs (scikit-image's bundled ones, cycled), a manifest of them, and CPU detectors with random
weights the script writes (names and shapes of the public checkpoints; the speed does not depend on the
values): torchvision's smallest Faster R-CNN and our bottom-up-attention detector on a ResNet-18. Each part
gets `threads / parts` torch threads, so both configurations use the same cores. The ratio is the
2-part run's images/s over the 1-part run's, on this machine. The outputs are compared byte for byte, and
decoded: the same samples with the same boxes, and the largest feature difference (one thread per part
against two in one process can change the last bits of a detector's sums, and so an int8 code).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel", "retina", "camera")


def write_inputs(folder: Path, count: int) -> Path:
    from PIL import Image
    from skimage import data

    rows = []
    for index in range(count):
        name = PHOTOS[index % len(PHOTOS)]
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        scale = 480 / max(image.size)
        image.resize((round(image.width * scale), round(image.height * scale))).save(folder / f"{index}.jpg")
        rows.append({"image": f"{index}.jpg", "caption": f"photograph {index} of a {name}", "image_id": str(index)})
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "m.jsonl"


def write_detectors(folder: Path) -> dict[str, str]:
    import torch
    import torchvision

    from vlbert_ds.model.detector import BottomUpAttentionDetector, BUASpec, save_detector

    torch.manual_seed(0)
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    net = getattr(torchvision.models.detection, arch)(weights=None, weights_backbone=None, num_classes=91)
    torch.save(net.state_dict(), folder / "frcnn.pth")
    bua = BottomUpAttentionDetector(BUASpec(backbone="resnet18", num_classes=1601))
    save_detector(bua, folder / "bua18.safetensors")
    return {f"torchvision {arch}": f"torchvision:{arch}:{folder / 'frcnn.pth'}",
            "bottom-up-attention resnet18": f"bua:{folder / 'bua18.safetensors'}"}


def run_parts(manifest: Path, detector: str, out: Path, parts: int, threads: int) -> float:
    command = [sys.executable, "-m", "vlbert_ds.prep.cli", "captions", "--manifest", str(manifest), "--detector",
               detector, "--no-images", "--out", str(out), "--samples-per-shard", "6", "--processes", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // parts)), "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    runs = [subprocess.Popen([*command, *(["--part", f"{i}/{parts}"] if parts > 1 else [])], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(parts)]
    for run in runs:
        output, _ = run.communicate()
        if run.returncode != 0:
            raise SystemExit(f"part failed:\n{output[-3000:]}")
    if parts > 1:
        done = subprocess.run([sys.executable, "-m", "vlbert_ds.prep.cli", "finalize", str(out)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
    return time.perf_counter() - start


def same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("shard-*.tar"))
    return names == sorted(p.name for p in b.glob("shard-*.tar")) and \
        all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def decoded(folder: Path) -> dict:
    """Sample key -> (source image id, boxes, features) of every shard in a folder."""
    import tarfile

    from vlbert_ds.data.schema import decode_vl

    samples: dict[str, dict] = {}
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                samples.setdefault(key, {"__key__": key})[field] = tar.extractfile(member).read()
    out = {}
    for key, sample in samples.items():
        record = decode_vl(sample, need_features=True, need_image=False)
        out[key] = (json.loads(sample["json"])["source"]["image_id"], record.boxes, record.features)
    return out


def feature_difference(a: Path, b: Path) -> tuple[bool, float]:
    """(same samples with the same boxes, the largest |difference| of their features)."""
    left, right = decoded(a), decoded(b)
    if left.keys() != right.keys() or any(left[k][0] != right[k][0] or left[k][1].shape != right[k][1].shape
                                          for k in left):
        return False, float("inf")
    worst = max((float(abs(left[k][2] - right[k][2]).max()) for k in left if left[k][2].size), default=0.0)
    return all(abs(left[k][1] - right[k][1]).max() < 1e-3 for k in left if left[k][1].size), worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--detector", action="append", choices=["torchvision", "bua"], default=None,
                        help="which detectors (default: both)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        manifest = write_inputs(root, args.images)
        chosen = args.detector or ["torchvision", "bua"]
        detectors = {n: s for n, s in write_detectors(root).items()
                     if ("torchvision" if n.startswith("torchvision") else "bua") in chosen}
        for name, spec in detectors.items():
            seconds = {parts: run_parts(manifest, spec, root / f"{len(results)}-{parts}", parts, args.threads)
                       for parts in (1, 2)}
            results.append({"detector": name, "images": args.images,
                            "one_part_images_per_s": args.images / seconds[1],
                            "two_parts_images_per_s": args.images / seconds[2],
                            "two_parts_over_one": seconds[1] / seconds[2],
                            "same_output": same_shards(root / f"{len(results)}-1", root / f"{len(results)}-2")})
            same_boxes, worst = feature_difference(root / f"{len(results) - 1}-1", root / f"{len(results) - 1}-2")
            results[-1].update(same_samples_and_boxes=same_boxes, max_feature_difference=worst)
    print(f"{'detector':<42} {'1 part img/s':>13} {'2 parts img/s':>14} {'ratio':>6} {'same bytes':>11} "
          f"{'same boxes':>11} {'max feat diff':>14}")
    for r in results:
        print(f"{r['detector']:<42} {r['one_part_images_per_s']:>13.2f} {r['two_parts_images_per_s']:>14.2f} "
              f"{r['two_parts_over_one']:>6.2f} {r['same_output']!s:>11} {r['same_samples_and_boxes']!s:>11} "
              f"{r['max_feature_difference']:>14.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                               "cpus": os.cpu_count(), "threads": args.threads,
                                               "note": "whole command (start-up, regions, shards, finalize)",
                                               "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
