"""Shard format 2's storage settings, measured: bytes per sample, decode rate, reconstruction error,
and the class top-k that keeps 99% of the probability mass.

Samples: a bottom-up-attention-like one (50 boxes, 2048-d ReLU features, 1601 classes whose
distribution is Dirichlet(alpha): alpha = 0.003 gives a mean top-1 probability of 0.30, a detector
that is often unsure) and the embedded default's scenes (their own features and 25-class scores).
Decode = `decode_vl` + `make_vl_example` (masking, truncation) on one core.

    python benchmarks/feature_compaction.py --default-data data/default \
        --json benchmarks/results/feature_compaction.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vlbert_ds.bundled import default_bert  # noqa: E402
from vlbert_ds.data.examples import ExampleConfig, TokenizerTools, make_vl_example, sample_rng  # noqa: E402
from vlbert_ds.data.schema import (  # noqa: E402
    DEFAULT_CLASS_TOPK,
    Compaction,
    VLRecord,
    decode_vl,
    encode_vl,
)
from vlbert_ds.data.streams import ReadSettings, ShardPiece, SkipCounter, read_indexed  # noqa: E402

SETTINGS = [("float16", 0), ("float16", DEFAULT_CLASS_TOPK), ("int8", 0), ("int8", DEFAULT_CLASS_TOPK),
            ("float8", DEFAULT_CLASS_TOPK)]


def bua_like(index: int, alpha: float = 0.003) -> VLRecord:
    rng = np.random.default_rng(index)
    features = np.maximum(rng.normal(0, 1, (50, 2048)), 0).astype(np.float32) * rng.uniform(0.5, 8, (50, 1))
    xy = rng.uniform(0, 400, (50, 2))
    boxes = np.column_stack([xy, xy + rng.uniform(10, 190, (50, 2))]).astype(np.float32)
    scores = rng.dirichlet(np.full(1601, alpha), 50).astype(np.float32)
    return VLRecord(key=f"000000_{index:06d}", caption="a man riding a wave on top of a surfboard", image_width=600,
                    image_height=800, boxes=boxes, scores=scores, features=features)


def default_records(folder: str, count: int) -> list[VLRecord]:
    url = str(Path(folder) / "vl/train/shard-000000.tar")
    records = []
    for _, sample in read_indexed(ShardPiece(url, 0), ReadSettings(), SkipCounter()):
        record = decode_vl(sample, need_features=True, need_image=False)
        records.append(VLRecord(key=record.key, caption=record.caption, image_width=record.image_width,
                                image_height=record.image_height, boxes=record.boxes, scores=record.dense_scores(),
                                features=record.dense_features()))
        if len(records) == count:
            break
    return records


def topk_mass(scores: np.ndarray, ks: list[int]) -> dict[str, float]:
    ordered = -np.sort(-scores, axis=1)
    kept = np.cumsum(ordered, axis=1) / ordered.sum(1, keepdims=True)
    out = {}
    for k in ks:
        if k <= scores.shape[1]:
            mass = kept[:, k - 1]
            out[str(k)] = {"mean": float(mass.mean()), "p5": float(np.quantile(mass, 0.05))}
    return out


def smallest_k(scores: np.ndarray, share: float = 0.99, boxes_share: float = 0.95) -> int:
    """The smallest k that keeps >= `share` of the mass on `boxes_share` of the boxes."""
    ordered = -np.sort(-scores, axis=1)
    kept = np.cumsum(ordered, axis=1) / ordered.sum(1, keepdims=True)
    per_box = np.argmax(kept >= share - 1e-6, axis=1) + 1
    return int(np.quantile(per_box, boxes_share, method="higher"))


def measure(records: list[VLRecord], num_classes: int, tools: TokenizerTools) -> list[dict]:
    rows = []
    config = ExampleConfig(num_region_classes=num_classes)
    for dtype, topk in SETTINGS:
        compaction = Compaction(dtype, topk if topk < num_classes else 0)
        samples = [encode_vl(r, compaction) for r in records]
        size = np.mean([sum(len(v) for k, v in s.items() if not k.startswith("__")) for s in samples])
        decoded = [decode_vl(s, need_features=True, need_image=False) for s in samples]
        error = max(float(np.abs(d.dense_features() - r.features).max()) for d, r in zip(decoded, records, strict=True))
        relative = max(float((np.abs(d.dense_features() - r.features).max(1) / np.abs(r.features).max(1)).max())
                       for d, r in zip(decoded, records, strict=True))
        mass = float(np.mean([d.dense_scores().sum(1).mean() / max(r.scores.sum(1).mean(), 1e-9) for d, r in
                              zip(decoded, records, strict=True)]))
        torch.set_num_threads(1)
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < 2.0:
            for sample in samples:
                record = decode_vl(sample, need_features=True, need_image=False)
                make_vl_example(record, tools, config, sample_rng(0, done, record.key))
                done += 1
        rate = done / (time.perf_counter() - start)
        rows.append({"features": dtype, "class_topk": compaction.class_topk, "bytes_per_sample": float(size),
                     "max_abs_feature_error": error, "max_error_over_box_peak": relative,
                     "class_mass_kept_before_renormalising": mass, "decode_samples_per_s": rate})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-data", default=None, help="a `vlbert-prep default` folder (optional)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("feature_compaction.json"))
    args = parser.parse_args(argv)
    tools = TokenizerTools(default_bert())
    result: dict = {"machine": {"cpus": os.cpu_count()}, "samples": args.samples}

    ks = [1, 2, 4, 8, 9, 16, 25, 32, 64, 128, 256]
    detector = {}
    for alpha in (0.001, 0.003, 0.01, 0.03):
        scores = np.concatenate([np.random.default_rng(i).dirichlet(np.full(1601, alpha), 50) for i in range(40)])
        detector[str(alpha)] = {"mean_top1": float(scores.max(1).mean()), "k_for_99pct_on_95pct_of_boxes":
                                smallest_k(scores), "mass_kept": topk_mass(scores, ks)}
    result["topk_bua_like_dirichlet"] = detector
    result["bua_like"] = measure([bua_like(i) for i in range(args.samples)], 1601, tools)
    if args.default_data:
        records = default_records(args.default_data, args.samples)
        scores = np.concatenate([r.scores for r in records]).astype(np.float32)
        result["topk_default_scenes"] = {"k_for_99pct_on_95pct_of_boxes": smallest_k(scores),
                                         "mass_kept": topk_mass(scores, ks)}
        result["default_scenes"] = measure(records, 25, tools)
        result["default_scenes_feature_dim"] = int(records[0].features.shape[1])

    print("class top-k keeping >= 99% of the mass on 95% of the boxes (1601-way Dirichlet):")
    for alpha, row in detector.items():
        print(f"  alpha {alpha:<6} mean top-1 {row['mean_top1']:.2f}: k = {row['k_for_99pct_on_95pct_of_boxes']}")
    if "topk_default_scenes" in result:
        print(f"  default scenes (25 classes): k = {result['topk_default_scenes']['k_for_99pct_on_95pct_of_boxes']}")
    for name in ("bua_like", "default_scenes"):
        if name not in result:
            continue
        base = result[name][0]["bytes_per_sample"]
        print(f"\n{name}: {'features':<8} {'top-k':>5} {'KB/sample':>10} {'smaller':>8} {'max err':>9} "
              f"{'err/peak':>9} {'decode/s/core':>14}")
        for row in result[name]:
            print(f"{'':<{len(name) + 2}}{row['features']:<8} {row['class_topk'] or 'dense':>5} "
                  f"{row['bytes_per_sample'] / 1e3:>10.1f} {base / row['bytes_per_sample']:>7.2f}x "
                  f"{row['max_abs_feature_error']:>9.4f} {row['max_error_over_box_peak']:>9.4f} "
                  f"{row['decode_samples_per_s']:>14.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
