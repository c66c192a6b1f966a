"""A scale model of pretraining on many GPUs, from measured inputs: what binds first, and how well it scales.

Inputs (measured; the JSON files of benchmarks/results, or the figures of ../shared/gpu/README.md):
* per-GPU step rate: the project's aim of 7,000 samples/s per H200 at BERT-base (the H200 peer,
  HF VisualBERT compiled, ran 5,576), scaled to large by the ratio of useful FLOPs per sample;
  this CPU's measured step times per preset are printed beside them;
* bytes per sample of each shard format (feature_compaction.json: a bottom-up-attention-like sample,
  50 boxes x 2048-d x 1601 classes; text segments from the default shards);
* loader samples/s per core (loader_throughput.json);
* gradient traffic per step from ZeRO's collectives, checked against DeepSpeed's own comms log on 2
  and 4 gloo ranks here (`--measure-comm`, via comm_probe.py).

Model, per step of `batch` samples per GPU (half vision-language), 8 GPUs and one NIC per node:
  compute      t_c = batch / rate
  gradients    inter-node bytes per node and direction = k x 2P x (n - 1) / n  (bf16; hierarchical:
               NVLink inside the node, each GPU's shard over the NIC; k = 2 for ZeRO-1/2:
               reduce-scatter + all-gather, 3 for ZeRO-3: one more parameter all-gather)
  data         bytes per node = 8 x batch x bytes/sample, over the NIC from object storage, or from
               local disk when the node-local cache holds the shards (epoch 2 on)
  loader CPU   samples per node / (loader cores x samples/s/core)
  step         max(t_c + exposed gradient time, NIC inbound (gradients + data), disk, loader CPU), the
               gradient time hiding behind the backward pass (2/3 of t_c) as DeepSpeed's overlap_comm
               does; efficiency = t_c / step.

    python benchmarks/scale_model.py --measure-comm --json benchmarks/results/scale_model.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
sys.path.insert(0, str(ROOT))

from vlbert_ds.model import VLBertConfig, VLBertForPretraining  # noqa: E402

GPUS_PER_NODE = 8
ELEMENTS_PER_SAMPLE = 54  # mean real elements of the paper's 1:1 batch (pretrain_step.py's batch: 1719 / 32)
BASE_RATE = 7000.0  # samples/s per H200 at base: the aim (the H200 peer, compiled VisualBERT, ran 5,576)
NVLINK_BYTES_PER_S = 450e9  # H200 NVLink 4, one direction per GPU
LOCAL_DISK_BYTES_PER_S = 6e9  # one NVMe drive per node, sequential reads (an assumption; not measured here)
LOADER_CORES_PER_NODE = 96  # of a 2 x 56-core H200 node, leaving some to the ranks (an assumption)
TEXT_BYTES_PER_SAMPLE = 2_560  # 64 int32 WordPieces + JSON + tar headers (measured on the default text shards)
BATCH_PER_GPU = 256
ZERO_FACTOR = {1: 2, 2: 2, 3: 3}


def parameters(preset: str) -> tuple[int, int]:
    """(all parameters, encoder parameters) of VLBertForPretraining at `preset` (counted on the meta device)."""
    config = VLBertConfig.preset(preset)
    with torch.device("meta"):
        model = VLBertForPretraining(config)
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.vlbert.encoder.parameters())
    return total, encoder


def flops_per_sample(preset: str) -> float:
    config = VLBertConfig.preset(preset)
    _, encoder = parameters(preset)
    attention = 12 * config.num_hidden_layers * config.hidden_size * ELEMENTS_PER_SAMPLE ** 2
    return 3 * (2 * encoder * ELEMENTS_PER_SAMPLE + attention)


def read(name: str) -> dict:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else {}


def bytes_per_vl_sample() -> dict[str, float]:
    """Shard bytes of a BUA-like sample per format (members + ~6 tar headers of 512 B and padding)."""
    rows = read("feature_compaction.json").get("bua_like", [])
    tar_overhead = 6 * 512 + 6 * 256
    found = {}
    for row in rows:
        name = f"{row['features']}" + (f" top-{row['class_topk']}" if row["class_topk"] else " dense")
        found[name] = row["bytes_per_sample"] + tar_overhead
    return found or {"float16 dense": 371_000.0, "int8 top-32": 115_300.0}


def loader_rate(shards: str) -> float:
    for row in read("loader_throughput.json").get("rows", []):
        if row.get("storage") == "local" and row.get("front_end") == "precomputed" and row.get("shards", "").startswith(
                shards):
            return row["ours_samples_per_s"]
    return {"float16": 1188.0, "int8": 1188.0}.get(shards.split(",")[0], 1188.0)


def model_point(gpus: int, nic_gbps: float, stage: int, params: int, rate: float, sample_bytes: float,
                cached: bool, loader_per_core: float) -> dict:
    nodes = max(1, gpus // GPUS_PER_NODE)
    per_node = min(gpus, GPUS_PER_NODE)
    nic = nic_gbps * 1e9 / 8
    t_compute = BATCH_PER_GPU / rate
    grad_bytes = 2 * params
    inter = ZERO_FACTOR[stage] * grad_bytes * (nodes - 1) / nodes
    intra = ZERO_FACTOR[stage] * grad_bytes * (per_node - 1) / per_node / NVLINK_BYTES_PER_S
    t_grad = max(inter / nic, intra)
    data = per_node * BATCH_PER_GPU * sample_bytes
    t_nic = (inter + (0 if cached else data)) / nic
    t_disk = data / LOCAL_DISK_BYTES_PER_S if cached else 0.0
    vl_share = 0.5
    t_loader = per_node * BATCH_PER_GPU * vl_share / (LOADER_CORES_PER_NODE * loader_per_core)
    candidates = {"compute": t_compute + max(0.0, t_grad - 2 / 3 * t_compute), "network (NIC)": t_nic,
                  "local disk": t_disk, "loader CPU": t_loader}
    bound = max(candidates, key=candidates.get)
    step = candidates[bound]
    if bound == "compute" and t_grad > 2 / 3 * t_compute:
        bound = "gradient all-reduce (exposed)"
    return {"gpus": gpus, "nic_gbps": nic_gbps, "zero_stage": stage, "cached": cached,
            "data_gb_per_s_per_gpu": data / per_node / step / 1e9,
            "data_gb_per_s_per_node": data / step / 1e9,
            "gradient_gb_per_step_per_node": inter / 1e9, "step_s": step, "efficiency": t_compute / step,
            "object_storage_gb_per_s_total": 0.0 if cached else data * nodes / step / 1e9,
            "bound_by": bound}


def measure_comm(preset: str) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (2, 4):
            for stage in (1, 2, 3):
                path = Path(tmp) / f"comm-{world}-{stage}.json"
                command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
                           "--master_port", str(29600 + 10 * world + stage), str(ROOT / "benchmarks/comm_probe.py"),
                           "--preset", preset, "--stage", str(stage), "--out", str(path)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
                if done.returncode != 0 or not path.exists():
                    raise RuntimeError(f"comm_probe {world} ranks ZeRO-{stage} failed:\n{done.stdout[-3000:]}"
                                       f"{done.stderr[-3000:]}")
                out.append(json.loads(path.read_text()))
    return out


def comm_check(measured: list[dict]) -> list[dict]:
    """Per rank and step: the model's message bytes (2 bytes per parameter per collective pass, k passes)
    against DeepSpeed's comms log (all-gather logged per rank's input: x world for the output)."""
    rows = []
    for m in measured:
        world, stage, params = m["world_size"], m["stage"], m["parameters"]
        logged = 0.0
        for op, values in m["collectives"].items():
            size = values["message_bytes_per_step"]
            # DeepSpeed logs an all-gather by its input (one rank's shard), a reduce-scatter by its input (all)
            logged += size * world if op in ("all_gather_into_tensor", "all_gather") else size
        predicted = ZERO_FACTOR[stage] * 2 * params
        rows.append({"world_size": world, "zero_stage": stage, "parameters": params,
                     "predicted_message_bytes": predicted, "logged_message_bytes": logged,
                     "logged_over_predicted": logged / predicted, "collectives": m["collectives"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-comm", action="store_true", help="run comm_probe.py on 2 and 4 gloo ranks")
    parser.add_argument("--comm-preset", default="tiny")
    parser.add_argument("--comm-results", nargs="*", default=[], help="comm_probe.py outputs already made")
    parser.add_argument("--json", type=Path, default=Path("scale_model.json"))
    args = parser.parse_args(argv)

    presets = {}
    for preset in ("tiny", "mini", "base", "large"):
        total, _ = parameters(preset)
        presets[preset] = {"parameters": total, "train_flops_per_sample": flops_per_sample(preset)}
    for preset in ("tiny", "mini"):
        step = read(f"pretrain_step_cpu_{preset}.json")
        if step:
            presets[preset]["cpu_seconds_per_sample_measured"] = 1 / step["results"]["ours"]["samples_per_s"]
    presets["base"]["h200_samples_per_s"] = BASE_RATE
    presets["large"]["h200_samples_per_s"] = BASE_RATE * presets["base"]["train_flops_per_sample"] / presets[
        "large"]["train_flops_per_sample"]

    formats = bytes_per_vl_sample()
    mixes = {name: 0.5 * size + 0.5 * TEXT_BYTES_PER_SAMPLE for name, size in formats.items()}
    chosen = {"format 1 (float16 dense)": ("float16 dense", "float16"),
              "format 2 default (int8 top-32)": ("int8 top-32", "int8")}
    points = []
    for preset in ("base", "large"):
        for label, (fmt, loader_key) in chosen.items():
            for cached in (False, True):
                for gpus in (8, 64, 512):
                    for nic in (100, 200, 400):
                        for stage in (1, 2, 3):
                            point = model_point(gpus, nic, stage, presets[preset]["parameters"],
                                                presets[preset]["h200_samples_per_s"], mixes[fmt], cached,
                                                loader_rate(loader_key))
                            points.append({"preset": preset, "format": label, **point})
    result = {"presets": presets, "vl_bytes_per_sample": formats, "mixed_bytes_per_sample": mixes,
              "assumptions": {"gpus_per_node": GPUS_PER_NODE, "batch_per_gpu": BATCH_PER_GPU,
                              "base_rate_samples_per_s": BASE_RATE, "nvlink_bytes_per_s": NVLINK_BYTES_PER_S,
                              "local_disk_bytes_per_s": LOCAL_DISK_BYTES_PER_S,
                              "loader_cores_per_node": LOADER_CORES_PER_NODE,
                              "text_bytes_per_sample": TEXT_BYTES_PER_SAMPLE},
              "points": points}
    if args.measure_comm or args.comm_results:
        measured = [json.loads(Path(f).read_text()) for f in args.comm_results] or measure_comm(args.comm_preset)
        result["comm_check"] = comm_check(sorted(measured, key=lambda m: (m["world_size"], m["stage"])))

    print(f"{'preset':<7} {'params':>12} {'GFLOP/sample':>13} {'H200 samples/s':>15} {'CPU s/sample':>13}")
    for name, p in presets.items():
        cpu = p.get("cpu_seconds_per_sample_measured")
        rate = p.get("h200_samples_per_s")
        print(f"{name:<7} {p['parameters']:>12,} {p['train_flops_per_sample'] / 1e9:>13.2f} "
              f"{f'{rate:,.0f}' if rate else '':>15} {f'{cpu:.4f}' if cpu else '':>13}")
    print(f"\n{'preset':<7} {'bf16 gradients MB':>18} {'ZeRO-1/2 MB/step':>17} {'ZeRO-3 MB/step':>15}   "
          "(collective volume per GPU and step, before the (n-1)/n of a ring)")
    for name, p in presets.items():
        grad = 2 * p["parameters"]
        p["gradient_bytes_bf16"] = grad
        print(f"{name:<7} {grad / 1e6:>18.1f} {2 * grad / 1e6:>17.1f} {3 * grad / 1e6:>15.1f}")
    print("\nbytes per sample (half BUA-like vision-language, half text): "
          + ", ".join(f"{k} {v / 1e3:.0f} KB" for k, v in mixes.items()))
    print(f"\n{'preset':<6} {'format':<31} {'cache':<6} {'GPUs':>5} {'Gb/s':>5} {'ZeRO':>4} {'GB/s/GPU':>9} "
          f"{'GB/s/node':>10} {'store GB/s':>10} {'eff.':>6}  bound by")
    for p in points:
        if p["zero_stage"] != 2 and not (p["gpus"] == 64 and p["preset"] == "base"):
            continue
        print(f"{p['preset']:<6} {p['format']:<31} {'yes' if p['cached'] else 'no':<6} {p['gpus']:>5} "
              f"{p['nic_gbps']:>5.0f} {p['zero_stage']:>4} {p['data_gb_per_s_per_gpu']:>9.2f} "
              f"{p['data_gb_per_s_per_node']:>10.2f} {p['object_storage_gb_per_s_total']:>10.1f} "
              f"{p['efficiency']:>6.2f}  {p['bound_by']}")
    if "comm_check" in result:
        print(f"\n{'ranks':>5} {'ZeRO':>4} {'predicted MB':>13} {'DeepSpeed log MB':>17} {'ratio':>6}")
        for row in result["comm_check"]:
            print(f"{row['world_size']:>5} {row['zero_stage']:>4} {row['predicted_message_bytes'] / 1e6:>13.2f} "
                  f"{row['logged_message_bytes'] / 1e6:>17.2f} {row['logged_over_predicted']:>6.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
