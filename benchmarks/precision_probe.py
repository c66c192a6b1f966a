"""What `train.precision: auto` picks on this machine, and why: one-thread matmul rates in fp32 and bf16.

Run it as is and under the emulation of a CPU without native bf16 (oneDNN and ATen capped at AVX2):

    .venv/bin/python benchmarks/precision_probe.py --json benchmarks/results/precision_native.json
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/precision_probe.py \
        --json benchmarks/results/precision_avx2_emulated.json

The matmul is the issue's probe: 384 x 384 @ 384 x 1536 (MiniLM's FFN), one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from vlbert_ds.train.precision import matmul_rates, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per dtype")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    choice = resolve_precision("auto", "cpu")
    rates = matmul_rates(384, args.seconds)
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
            if k in os.environ}
    print(f"caps: {caps or 'none'}; ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'dtype':<6} {'GFLOP/s':>9}")
    for name, rate in rates.items():
        print(f"{name:<6} {rate:>9.1f}")
    print(f"bf16 / fp32: {rates['bf16'] / rates['fp32']:.3f}")
    print(f"auto -> {choice.precision}: {choice.reason}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "auto": choice.precision, "reason": choice.reason, "gflops": rates,
            "bf16_over_fp32": rates["bf16"] / rates["fp32"], "caps": caps,
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                        "date": time.strftime("%Y-%m-%d")}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
