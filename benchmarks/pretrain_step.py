"""One pretraining optimiser step of our VL-BERT vs Hugging Face VisualBERT, same dims, batch and shapes.

    python benchmarks/pretrain_step.py --device cpu --preset mini --json benchmarks/results/pretrain_step_cpu_mini.json
    python benchmarks/pretrain_step.py --device cuda --preset base --json OUT.json [--compile]
    python benchmarks/pretrain_step.py --engine --json OUT.json      # our DeepSpeed engine on the default data

The batch is the paper's per-step mix, 1:1: vision-language samples of <= 64 elements (caption of
10-30 WordPieces incl. [CLS]/[SEP], 10-36 RoIs of 2048-d incl. the whole image, truncated as the
official loader does) and text-only segments of 64 tokens; 15% of words and RoIs masked. Both models
run forward, backward and an AdamW step under the same autocast dtype, in one process, alternating
so that neither gets a warmer machine. HF VisualBERT takes the batch the only way it can: every row
padded to the longest text and the most RoIs, the MLM vocabulary projection over all positions, and
its sentence-image head on (HF's pretraining loss); it has no masked-RoI head.

Useful FLOPs count only what a correct model must compute: the encoder over real elements (6 x
params x elements, + attention 12 x L x H x sum(n^2)), the visual fusion over real RoIs, the MLM head
at masked words and the MRC head at masked RoIs; x3 for forward + backward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlbert_ds.model import VLBatch, VLBertConfig, VLBertForPretraining

DEFAULT_BATCH = {"tiny": 32, "mini": 32, "base": 256, "large": 128}  # rows per step, half VL half text


def make_mix(rows: int, num_classes: int, seed: int = 0) -> dict:
    """The per-step mix as plain tensors (shared by both models)."""
    gen = torch.Generator().manual_seed(seed)
    vl, text = rows // 2, rows - rows // 2
    texts, rois = [], []
    for _ in range(vl):
        t = int(torch.randint(10, 31, (1,), generator=gen))
        r = int(torch.randint(10, 37, (1,), generator=gen))
        while t + r > 64:  # official truncation: shorten the longer side first
            if t > r:
                t -= 1
            else:
                r -= 1
        texts.append(t)
        rois.append(r)
    texts += [64] * text
    return {"vl": vl, "text": text, "text_len": texts, "rois": rois, "gen": gen, "num_classes": num_classes}


def ours_batch(mix: dict, vocab: int) -> VLBatch:
    gen = mix["gen"]
    rows = mix["vl"] + mix["text"]
    t_max, r_max = max(mix["text_len"]), max(mix["rois"])
    input_ids = torch.randint(1000, vocab, (rows, t_max), generator=gen)
    text_mask = torch.arange(t_max)[None] < torch.tensor(mix["text_len"])[:, None]
    input_ids[~text_mask] = 0
    mlm_labels = torch.where((torch.rand(rows, t_max, generator=gen) < 0.15) & text_mask, input_ids, -1)
    region_mask = torch.zeros(rows, r_max, dtype=torch.bool)
    for row, r in enumerate(mix["rois"]):
        region_mask[row, :r] = True
    xy = torch.rand(rows, r_max, 2, generator=gen) * 300
    boxes = torch.cat((xy, xy + torch.rand(rows, r_max, 2, generator=gen) * 160 + 8), -1)
    boxes[:, 0] = torch.tensor([0.0, 0.0, 639.0, 479.0])  # RoI 0 = the whole image
    boxes = boxes * region_mask[..., None]
    features = torch.rand(rows, r_max, 2048, generator=gen) * region_mask[..., None]
    selected = (torch.rand(rows, r_max, generator=gen) < 0.15) & region_mask
    selected[:, 0] = False
    targets = torch.softmax(torch.randn(int(selected.sum()), mix["num_classes"], generator=gen), -1)
    has_image = torch.arange(rows) < mix["vl"]
    return VLBatch(input_ids=input_ids, text_mask=text_mask, token_type_ids=torch.zeros_like(input_ids),
                   has_image=has_image, boxes=boxes, region_mask=region_mask,
                   image_size=torch.tensor([[640.0, 480.0]]).expand(rows, 2) * has_image[:, None],
                   region_features=features.half(), region_masked=selected, mlm_labels=mlm_labels,
                   mrc_select=selected, mrc_targets=targets)


def hf_inputs(batch: VLBatch) -> dict:
    """The same rows for HF VisualBERT: text padded to the longest, every row with R visual slots."""
    rows = batch.batch_size
    labels_text = batch.mlm_labels.clone()
    labels_text[labels_text < 0] = -100
    regions = batch.region_mask.shape[1]
    labels = torch.cat((labels_text, torch.full((rows, regions), -100)), 1)
    return {"input_ids": batch.input_ids, "attention_mask": batch.text_mask.long(),
            "token_type_ids": batch.token_type_ids, "visual_embeds": batch.region_features.float(),
            "visual_attention_mask": batch.region_mask.long(),
            "visual_token_type_ids": torch.ones(rows, regions, dtype=torch.long), "labels": labels,
            "sentence_image_labels": torch.zeros(rows, dtype=torch.long)}


def useful_flops(config: VLBertConfig, batch: VLBatch) -> float:
    """Forward + backward FLOPs a correct model must spend on this batch (see the module doc)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    elements = (batch.text_mask.sum(1) + batch.region_mask.sum(1) + 1).double()  # + [END]
    per_layer_params = 4 * h * h + 2 * h * inter
    encoder = 2 * per_layer_params * layers * float(elements.sum()) + 4 * layers * h * float((elements ** 2).sum())
    fusion = 2 * 4096 * h * float(batch.region_mask.sum())
    masked_words = float((batch.mlm_labels >= 0).sum())
    masked_rois = float(batch.mrc_select.sum())
    heads = (masked_words * 2 * (h * h + h * config.vocab_size)
             + masked_rois * 2 * (h * h + h * config.num_region_classes))
    return 3 * (encoder + fusion + heads)


def tokens(batch: VLBatch) -> int:
    return int(batch.text_mask.sum() + batch.region_mask.sum())


def build_models(preset: str, device: str, num_classes: int):
    from transformers import VisualBertConfig, VisualBertForPreTraining

    ours_config = VLBertConfig.preset(preset, num_region_classes=num_classes, max_position_embeddings=512,
                                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    ours = VLBertForPretraining(ours_config).to(device)
    hf_config = VisualBertConfig(vocab_size=ours_config.vocab_size, hidden_size=ours_config.hidden_size,
                                 num_hidden_layers=ours_config.num_hidden_layers,
                                 num_attention_heads=ours_config.num_attention_heads,
                                 intermediate_size=ours_config.intermediate_size, visual_embedding_dim=2048,
                                 max_position_embeddings=512)
    hf = VisualBertForPreTraining(hf_config).to(device)
    return ours, hf


def timed_steps(step, steps: int, device: str) -> list[float]:
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def bench_step(args) -> dict:
    device = args.device
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    ours, hf = build_models(args.preset, device, args.num_classes)
    if args.compile:
        ours, hf = torch.compile(ours), torch.compile(hf)
    batch = ours_batch(make_mix(args.batch or DEFAULT_BATCH[args.preset], args.num_classes),
                       ours.config.vocab_size if hasattr(ours, "config") else 30522).to(device)
    hf_batch = {k: v.to(device) for k, v in hf_inputs(batch).items()}
    fused = device == "cuda"
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=fused or None)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=fused or None)

    def autocast():
        return torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None)

    def step_ours():
        with autocast():
            loss = ours(batch).loss
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        with autocast():
            loss = hf(**hf_batch).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step_ours()
        step_hf()
    results = {"ours": [], "hf_visualbert": []}
    for _ in range(args.rounds):  # alternate so that neither model gets a quieter machine
        results["ours"] += timed_steps(step_ours, args.steps, device)
        results["hf_visualbert"] += timed_steps(step_hf, args.steps, device)
    rows = batch.batch_size
    flops = useful_flops(ours.config if hasattr(ours, "config") else ours._orig_mod.config, batch)
    table = {}
    for name, times in results.items():
        median = statistics.median(times)
        table[name] = {"step_s_median": median, "step_s_all": times, "samples_per_s": rows / median,
                       "tokens_per_s": tokens(batch) / median, "useful_tflops": flops / median / 1e12}
    if device == "cuda":
        table["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        table["peak_rss_gib_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    ratio = table["ours"]["samples_per_s"] / table["hf_visualbert"]["samples_per_s"]
    return {"mode": "step", "device": device, "preset": args.preset, "precision": args.precision,
            "compile": args.compile, "rows": rows, "vl_rows": int(batch.has_image.sum()),
            "real_elements": tokens(batch), "hf_padded_elements": rows * (batch.input_ids.shape[1]
                                                                         + batch.region_mask.shape[1]),
            "useful_flops_per_step": flops, "results": table, "ratio_vs_hf_visualbert": ratio}


def bench_engine(args) -> dict:
    """Our DeepSpeed engine end to end on (a small copy of) the embedded default, one process."""
    import tempfile

    from vlbert_ds.bundled import default_bert
    from vlbert_ds.prep.default import prepare_default
    from vlbert_ds.train.config import load_config
    from vlbert_ds.train.distributed import discover, init_distributed
    from vlbert_ds.train.pretrain import run

    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    work = Path(args.work or tempfile.mkdtemp(prefix="vlbert-engine-bench-"))
    data = work / "data"
    if not (data / "text/train/sizes.json").is_file():
        prepare_default(str(data), default_bert(), num_images=600, num_val_images=20, num_text_segments=600,
                        processes=max(1, os.cpu_count() or 1))
    per = (args.batch or 32) // 2
    config = load_config(None, [
        "model.bert=default", "model.num_region_classes=25", f"data.vl_sources=[{data}/vl/train]",
        f"data.text_sources=[{data}/text/train]", "data.mode=resampled", "data.samples_per_epoch=100000",
        f"data.vl_per_batch={per}", f"data.text_per_batch={per}", f"data.num_workers={args.workers}",
        f"train.steps={args.warmup + args.steps}", f"train.precision={args.precision}", "train.log_every=0",
        f"train.output_dir={work / 'run'}", "checkpoint.every=100000", "checkpoint.export=false",
        "checkpoint.resume=false", "tracking.enabled=false"])
    dist = discover()
    init_distributed(dist)
    run(config, dist)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    return {"mode": "engine", "device": args.device, "preset": "mini (bundled MiniLM)", "precision": args.precision,
            "rows_per_step": 2 * per, "steps_timed": len(rows), "loader_workers": args.workers,
            "samples_per_s_median": statistics.median(r["samples_per_s"] for r in rows),
            "data_wait_fraction_median": statistics.median(r["data_wait_fraction"] for r in rows)}


def print_table(result: dict) -> None:
    if result["mode"] == "engine":
        print(f"\nengine end to end ({result['device']}, {result['precision']}, {result['rows_per_step']} rows/step, "
              f"{result['loader_workers']} loader workers): {result['samples_per_s_median']:.1f} samples/s, "
              f"data wait {100 * result['data_wait_fraction_median']:.1f}% of the step")
        return
    print(f"\n{result['preset']} on {result['device']} ({result['precision']}, compile={result['compile']}), "
          f"{result['rows']} rows/step ({result['vl_rows']} VL), {result['real_elements']} real elements "
          f"(HF pads to {result['hf_padded_elements']})")
    print(f"{'model':<16}{'step (ms)':>12}{'samples/s':>12}{'tokens/s':>12}{'useful TFLOP/s':>16}")
    for name in ("ours", "hf_visualbert"):
        r = result["results"][name]
        print(f"{name:<16}{1000 * r['step_s_median']:>12.1f}{r['samples_per_s']:>12.1f}{r['tokens_per_s']:>12.0f}"
              f"{r['useful_tflops']:>16.4f}")
    print(f"ratio (ours / HF VisualBERT, samples/s): {result['ratio_vs_hf_visualbert']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="mini", choices=["tiny", "mini", "base", "large"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto: bf16 where the device computes it natively, else fp32 (train.precision=auto)")
    parser.add_argument("--batch", type=int, default=0, help="rows per step (default by preset)")
    parser.add_argument("--num-classes", type=int, default=1601)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--engine", action="store_true", help="our DeepSpeed engine on the default data instead")
    parser.add_argument("--workers", type=int, default=1, help="--engine: loader workers")
    parser.add_argument("--work", default="", help="--engine: folder for data and the run")
    parser.add_argument("--json", default="", help="write the result here")
    args = parser.parse_args()
    from vlbert_ds.train.precision import resolve_precision

    choice = resolve_precision(args.precision, args.device)
    args.precision = choice.precision
    print(f"precision {choice.precision}: {choice.reason}")
    result = bench_engine(args) if args.engine else bench_step(args)
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                         "date": time.strftime("%Y-%m-%d")}
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
