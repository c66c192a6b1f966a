"""One CPU AdamW step over a flat fp32 partition the size of MiniLM's VL-BERT: torch's three implementations.

What a ZeRO-1/2 rank hands its optimizer on a CPU is one flat fp32 tensor per parameter group; the trainer
builds `torch.optim.AdamW(fused=True)` for it (vlbert_ds/train/engine.py: build_optimizer). This script times
the peers on the same tensor and thread count: the default for-loop implementation (what the trainer used
before), `foreach=True`, and `fused=True`, and checks that the fused update equals the for-loop one.

    .venv/bin/python benchmarks/optimizer_step.py --json benchmarks/results/optimizer_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

IMPLEMENTATIONS = {"for-loop (default)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def time_step(numel: int, options: dict, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of one AdamW step on a flat `numel` parameter; also the parameter after 3 steps."""
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(numel, generator=generator))
    param.grad = torch.randn(numel, generator=generator)
    optimizer = torch.optim.AdamW([param], lr=2e-4, weight_decay=1e-4, eps=1e-6, **options)
    for _ in range(3):
        optimizer.step()
    after_three = param.detach().clone()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2], after_three


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=22_700_000, help="parameters (MiniLM's VL-BERT: 22.7 M)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a test or CPU rank uses 1)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, results = {}, {}
    for name, options in IMPLEMENTATIONS.items():
        rows[name], results[name] = time_step(args.numel, options, args.repeats)
    base = rows["for-loop (default)"]
    print(f"AdamW step, {args.numel / 1e6:.1f} M fp32 parameters, {args.threads} thread(s)")
    print(f"{'implementation':<20} {'s/step':>8} {'vs for-loop':>12}")
    for name, seconds in rows.items():
        print(f"{name:<20} {seconds:>8.4f} {base / seconds:>11.1f}x")
    deviation = float((results["fused"] - results["for-loop (default)"]).abs().max())
    print(f"fused vs for-loop after 3 steps: max |difference| {deviation:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "numel": args.numel, "threads": args.threads, "seconds_per_step": rows,
            "speedup_over_for_loop": {k: base / v for k, v in rows.items()},
            "fused_vs_for_loop_max_abs_diff": deviation,
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                        "date": time.strftime("%Y-%m-%d")}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
