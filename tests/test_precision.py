"""`train.precision: auto`: the choice follows the hardware (and the caps put on it), with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vlbert_ds.train import precision as precision_module
from vlbert_ds.train.config import load_config, resume_changes
from vlbert_ds.train.engine import build_ds_config
from vlbert_ds.train.precision import cpu_bf16_support, resolve_precision

CAPPED = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # how the docs emulate an AVX2-only CPU


@pytest.fixture(autouse=True)
def _fresh_detection():
    cpu_bf16_support.cache_clear()
    yield
    cpu_bf16_support.cache_clear()


def _cpu_flags() -> set[str]:
    from pathlib import Path

    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def test_auto_is_the_default_and_never_survives_loading(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    config = load_config(None, ["data.vl_sources=[x]"])
    assert config.train.precision in ("bf16", "fp32")
    assert config.train.precision_reason.startswith("auto: ")
    assert f"precision: {config.train.precision}" in config.to_yaml()
    assert config.flat()["train.precision_reason"] == config.train.precision_reason  # what MLflow gets
    ds = build_ds_config(config.train, config.optimizer, 4, 1, {})
    assert ds["bf16"]["enabled"] == (config.train.precision == "bf16") and not ds["fp16"]["enabled"]
    explicit = load_config(None, ["data.vl_sources=[x]", "train.precision=fp32"])
    assert explicit.train.precision == "fp32" and "as configured" in explicit.train.precision_reason


def test_auto_follows_the_cpu_flags(monkeypatch):
    """bf16 exactly when the CPU reports avx512_bf16 or amx_bf16 (read here from /proc/cpuinfo
    independently) and nothing caps oneDNN below them."""
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(variable, raising=False)
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the flag names checked here are x86's")
    native = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    # In a fresh process without caps: oneDNN reads ONEDNN_MAX_CPU_ISA once per process, so a suite run
    # under the AVX2 emulation could not lift the cap here.
    env = {k: v for k, v in os.environ.items() if k not in (*CAPPED, "DNNL_MAX_CPU_ISA")}
    probe = "from vlbert_ds.train.precision import resolve_precision; print(resolve_precision('auto', 'cpu').precision)"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == ("bf16" if native else "fp32")
    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: {"avx2", "fma", "sse4_2"})
    cpu_bf16_support.cache_clear()
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and "no avx512_bf16 or amx_bf16" in choice.reason
    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # e.g. a Skylake-class cap: bf16 emulated
    cpu_bf16_support.cache_clear()
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX512_CORE" in choice.reason
    assert resolve_precision("bf16", "cpu").precision == "bf16"  # an explicit choice is kept


def test_the_emulated_cpu_resolves_to_fp32_and_warns_with_the_measured_slowdown(tmp_path):
    """With oneDNN capped at AVX2 (the docs' way to emulate an AVX2-only CPU) auto picks fp32, and an
    explicit bf16 gets a warning whose numbers are measured matmul rates, bf16 the slow one."""
    probe = (
        "import json; from vlbert_ds.train.config import load_config; "
        "from vlbert_ds.train.precision import slow_bf16_warning, resolve_precision, matmul_rates; "
        "auto = load_config(None, ['data.vl_sources=[x]']).train; "
        "asked = resolve_precision('bf16', 'cpu'); "
        "print(json.dumps({'auto': auto.precision, 'reason': auto.precision_reason, "
        "'warning': slow_bf16_warning(asked.precision, 'cpu'), 'rates': matmul_rates()}))"
    )
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **CAPPED}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["auto"] == "fp32", result
    assert result["rates"]["bf16"] * 4 < result["rates"]["fp32"], result["rates"]  # emulated: much slower
    assert "x slower" in result["warning"] and "train.precision=auto" in result["warning"]


def test_a_resume_whose_auto_precision_resolves_otherwise_is_refused_with_the_way_out():
    config = load_config(None, ["data.vl_sources=[x]", "train.precision=fp32"])
    saved = json.loads(json.dumps(config.to_dict()))
    saved["train"]["precision"] = "bf16"
    with pytest.raises(ValueError, match=r"train\.precision: 'bf16' -> 'fp32'.*checkpoint's value"):
        resume_changes(saved, config, "runs/x")


@pytest.mark.slow
def test_a_run_says_its_precision_and_warns_when_bf16_is_emulated(default_data, tmp_path):
    """As a user sees it: `vlbert-pretrain` prints the precision and why; an explicit bf16 on a CPU
    without native bf16 (emulated here by the oneDNN/ATen caps) runs, with the measured slowdown."""
    from ranks import TINY

    base = [*TINY, "model.num_region_classes=25", f"data.vl_sources=[{default_data}/vl/train]",
            f"data.text_sources=[{default_data}/text/train]", "data.samples_per_epoch=16", "data.num_workers=0",
            "data.vl_per_batch=2", "data.text_per_batch=2", "train.steps=1", "tracking.enabled=false",
            "checkpoint.export=false", "train.log_every=0"]
    env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", **CAPPED}
    runs = {}
    for name, extra in (("auto", []), ("bf16", ["train.precision=bf16"])):
        runs[name] = subprocess.run([sys.executable, "-m", "vlbert_ds.cli.pretrain", *base, *extra,
                                     f"train.output_dir={tmp_path / name}"], env=env, capture_output=True,
                                    text=True, timeout=900)
        assert runs[name].returncode == 0, runs[name].stdout[-2000:] + runs[name].stderr[-2000:]
    auto = runs["auto"].stdout + runs["auto"].stderr
    # the reason names the missing flags on a CPU without them, the cap on one with them
    assert "precision fp32: auto: " in auto and "x slower" not in auto
    assert ("no avx512_bf16 or amx_bf16" in auto) != ("ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off" in auto)
    asked = runs["bf16"].stdout + runs["bf16"].stderr
    assert "precision bf16: train.precision=bf16 as configured" in asked
    assert "train.precision=bf16 on a CPU without native bf16" in asked and "x slower" in asked
