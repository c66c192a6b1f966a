"""The benchmark scripts run and write what their docs promise (speeds are not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pretrain_step_benchmark_writes_both_models_and_the_ratio(tmp_path):
    out = tmp_path / "step.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pretrain_step.py"), "--preset", "tiny",
                           "--batch", "8", "--warmup", "1", "--steps", "1", "--rounds", "1", "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["results"]) >= {"ours", "hf_visualbert"}
    for name in ("ours", "hf_visualbert"):  # each rate is the rows over the median of the timed steps
        times = sorted(result["results"][name]["step_s_all"])
        assert len(times) == 1 and result["results"][name]["samples_per_s"] == result["rows"] / times[0]
    ours, hf = (result["results"][n]["samples_per_s"] for n in ("ours", "hf_visualbert"))
    assert result["ratio_vs_hf_visualbert"] == ours / hf
    assert result["rows"] == 8  # --batch 8
    assert result["real_elements"] < result["hf_padded_elements"]  # HF pads every row; we do not
    assert f"{result['ratio_vs_hf_visualbert']:.2f}x" in done.stdout
    assert "ratio (ours / HF VisualBERT" in done.stdout



def test_extract_regions_benchmark_writes_the_time_shares(tmp_path):
    out = tmp_path / "regions.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "extract_regions.py"), "--arch", "bua-resnet18",
                           "--arch", "fasterrcnn_mobilenet_v3_large_320_fpn", "--images", "2", "--batch-size", "1",
                           "--warmup", "0", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["arch"] for r in rows] == ["bua-resnet18", "fasterrcnn_mobilenet_v3_large_320_fpn"]
    for row in rows:
        assert row["images"] == 2 and row["images_per_s"] > 0 and 10 <= row["boxes_per_image"] <= 100
        assert 0.5 < sum(row["share"].values()) <= 1.0 + 1e-6  # the parts cover the loop, save the image copies
    assert rows[0]["classes"] == 1601 and rows[0]["feature_dim"] == 512
    assert rows[1]["speed_vs_first"] == rows[1]["images_per_s"] / rows[0]["images_per_s"]
    assert "bottom-up-attention resnet18" in done.stdout and "fasterrcnn_mobilenet_v3_large_320_fpn" in done.stdout


def test_feature_compaction_benchmark_measures_every_setting(tmp_path):
    out = tmp_path / "compaction.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "feature_compaction.py"), "--samples", "3",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["features"], r["class_topk"]): r for r in json.loads(out.read_text())["bua_like"]}
    assert set(rows) == {("float16", 0), ("float16", 32), ("int8", 0), ("int8", 32), ("float8", 32)}
    # 50 x (2048 x 2 + 1601 x 2) bytes dense float16; 50 x (2048 + 4 + 32 x 4) at the defaults
    assert rows[("float16", 0)]["bytes_per_sample"] > 50 * 3649 * 2
    assert rows[("float16", 0)]["bytes_per_sample"] / rows[("int8", 32)]["bytes_per_sample"] >= 3.0
    assert rows[("float16", 0)]["max_abs_feature_error"] < rows[("int8", 32)]["max_abs_feature_error"]


def test_scale_model_names_a_bottleneck_at_every_point(tmp_path):
    out = tmp_path / "scale.json"
    probes = sorted(str(p) for p in (REPO / "benchmarks/results/comm_probe").glob("*.json"))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale_model.py"), "--comm-results", *probes,
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["points"]) == 2 * 2 * 2 * 3 * 3 * 3
    assert all(0 < p["efficiency"] <= 1 and p["bound_by"] for p in result["points"])
    single_node = [p for p in result["points"] if p["gpus"] == 8]
    assert all(p["gradient_gb_per_step_per_node"] == 0 for p in single_node)  # no inter-node gradients
    assert [round(c["logged_over_predicted"], 2) for c in result["comm_check"] if c["zero_stage"] == 2] == [0.98] * 2


def test_precision_probe_reports_the_choice_and_both_rates(tmp_path):
    out = tmp_path / "precision.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "precision_probe.py"), "--seconds", "0.1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["auto"] in ("bf16", "fp32") and result["reason"].startswith("auto: ")
    assert set(result["gflops"]) == {"fp32", "bf16"} and all(v > 0 for v in result["gflops"].values())
    assert result["bf16_over_fp32"] == result["gflops"]["bf16"] / result["gflops"]["fp32"]
    assert f"auto -> {result['auto']}" in done.stdout


def test_optimizer_step_benchmark_times_the_three_adamw_implementations(tmp_path):
    out = tmp_path / "optimizer.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "optimizer_step.py"), "--numel", "100000",
                           "--repeats", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["seconds_per_step"]) == {"for-loop (default)", "foreach", "fused"}
    assert all(v > 0 for v in result["seconds_per_step"].values())
    assert result["speedup_over_for_loop"]["for-loop (default)"] == 1.0
    assert result["fused_vs_for_loop_max_abs_diff"] < 1e-6  # the same update, not just a faster one
    assert "fused vs for-loop after 3 steps" in done.stdout


def test_prep_parts_benchmark_times_one_and_two_parts_and_checks_they_agree(tmp_path):
    out = tmp_path / "parts.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prep_parts.py"), "--images", "4",
                           "--detector", "torchvision", "--json", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["images"] == 4 and row["same_output"] is True
    ratio = row["two_parts_images_per_s"] / row["one_part_images_per_s"]
    assert abs(row["two_parts_over_one"] - ratio) <= 1e-9 * ratio
    assert "2 parts img/s" in done.stdout
