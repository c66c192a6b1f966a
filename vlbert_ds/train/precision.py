"""`train.precision: auto`: bf16 where the hardware computes it natively, else fp32.

Why a choice at all: bf16 halves the step time on GPUs from Ampere on and on CPUs with AVX512-BF16
or AMX, but a CPU without those instructions emulates it, and a bf16 matmul there runs ~40x slower
than fp32 (0.9 vs 39.9 GFLOP/s on an AVX2-only EPYC; 1.4 vs 56 GFLOP/s here with oneDNN capped at
AVX2). So `auto` asks the hardware, never the vendor name: the CPU's feature flags (`avx512_bf16`,
`amx_bf16`; `bf16` on Arm), and the caps a user or a test can put on oneDNN
(`ONEDNN_MAX_CPU_ISA`/`DNNL_MAX_CPU_ISA` below `AVX512_CORE_BF16`) and on ATen's bf16 kernels
(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`), since those make bf16 the slow path on a CPU
that has the instructions. fp16 is never chosen by `auto` (it needs loss scaling and a GPU).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from functools import cache
from typing import Literal

Precision = Literal["bf16", "fp16", "fp32"]

# oneDNN ISA names (its ONEDNN_MAX_CPU_ISA values) that include native bf16 dot products.
_ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                     "AVX10_2_512_AMX_2", "ALL", "DEFAULT"}


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Precision
    reason: str


def training_device_type() -> str:
    """Where the engine will run: what `launch/local.sh` and `distributed.init_distributed` decide."""
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (Linux); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


@cache
def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU, why): the instructions present and not capped off by the environment."""
    flags = _cpu_flags()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        present = sorted(flags & {"avx512_bf16", "amx_bf16"})
        if not present:
            return False, "this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)"
    elif machine in ("aarch64", "arm64"):
        if "bf16" not in flags:
            return False, "this Arm CPU reports no bf16 feature"
        present = ["bf16"]
    else:
        return False, f"native bf16 is not detected on {machine or 'this machine'}"
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(variable, "").strip().upper()
        if cap and machine in ("x86_64", "amd64") and cap not in _ONEDNN_BF16_ISAS:
            return False, f"{variable}={cap} keeps oneDNN off the CPU's bf16 instructions ({', '.join(present)})"
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, f"PyTorch's oneDNN bf16 kernels are off here despite {', '.join(present)}"
    return True, f"this CPU computes bf16 natively ({', '.join(present)})"


def resolve_precision(requested: str, device_type: str | None = None) -> PrecisionChoice:
    """The precision a run uses for `train.precision=requested` on `device_type` (default: detected)."""
    device_type = device_type or training_device_type()
    if requested != "auto":
        return PrecisionChoice(requested, f"train.precision={requested} as configured")  # type: ignore[arg-type]
    if device_type == "cuda":
        import torch

        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice("bf16", f"auto: {torch.cuda.get_device_name()} computes bf16 natively")
        return PrecisionChoice("fp32", f"auto: {torch.cuda.get_device_name()} has no native bf16")
    native, why = cpu_bf16_support()
    return PrecisionChoice("bf16" if native else "fp32", f"auto: {why}")


def matmul_rates(size: int = 256, seconds: float = 0.2) -> dict[str, float]:
    """GFLOP/s of one-thread CPU matmuls (size x size @ size x 4*size) in fp32 and bf16."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, 4 * size, dtype=dtype)
            a @ b
            count, start = 0, time.perf_counter()
            while count < 2 or time.perf_counter() - start < seconds:
                a @ b
                count += 1
            rates[name] = 2 * size * size * 4 * size * count / (time.perf_counter() - start) / 1e9
        return rates
    finally:
        torch.set_num_threads(threads)


def slow_bf16_warning(precision: str, device_type: str) -> str | None:
    """A warning with the measured slowdown when bf16 was asked for on a CPU that emulates it."""
    if precision != "bf16" or device_type != "cpu":
        return None
    native, why = cpu_bf16_support()
    if native:
        return None
    rates = matmul_rates()
    return (f"train.precision=bf16 on a CPU without native bf16 ({why}): a bf16 matmul runs at "
            f"{rates['bf16']:.1f} GFLOP/s here against {rates['fp32']:.1f} in fp32, "
            f"{rates['fp32'] / max(rates['bf16'], 1e-9):.0f}x slower; train.precision=auto (or fp32) avoids it")
