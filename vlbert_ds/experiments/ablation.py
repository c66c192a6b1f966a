"""`vlbert-finetune --task all --quick`: does our pretraining help? The analogue of the paper's Table 4.

On the synthetic VQA, VCR (Q->A, QA->R, joint Q->AR) and RefCOCO+ tasks (prep/synthetic_tasks.py),
fine-tune (a) from a VL-BERT pretraining checkpoint and (b) from the BERT checkpoint alone, with the
same recipe, steps and seed, and write `ablation.md` (table), `ablation.png` (bar plot) and
`ablation.json`. Without `--init` a pretraining on the embedded default runs first (budgets below).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from vlbert_ds.train.config import FinetuneConfig, PretrainConfig, load_config, takes_key
from vlbert_ds.train.distributed import discover

# (name in the table, task, VCR mode)
RUNS = (("VQA", "vqa", "q2a"), ("VCR Q->A", "vcr", "q2a"), ("VCR QA->R", "vcr", "qa2r"),
        ("RefCOCO+", "refcoco", "q2a"))
INITS = ("pretrained", "bert_only")
# Shared by the pretraining and the BERT-only model: the visual LayerNorm gain start (configs/default.yaml).
MODEL_OVERRIDES = 'model.overrides={"visual_ln_gain_init": 0.05}'


@dataclass
class Budget:
    pretrain_steps: int
    finetune_steps: int
    train_scenes: int
    val_scenes: int


# 1,500 pretraining steps is about where the default scenes' grounding emerges: after 300 steps every
# task but VQA stayed at chance after fine-tuning, after 500 RefCOCO+ still did (docs/finetuning.md).
QUICK = Budget(pretrain_steps=1500, finetune_steps=150, train_scenes=2000, val_scenes=400)
FULL = Budget(pretrain_steps=4000, finetune_steps=600, train_scenes=8000, val_scenes=1000)


def pretrain_for_ablation(output: Path, steps: int, overrides: list[str] = ()) -> str:
    """A short single-process pretraining on the embedded default; returns its exported folder."""
    from vlbert_ds.bundled import default_bert
    from vlbert_ds.prep.default import GROUNDING_WORDS, ensure_default
    from vlbert_ds.train.pretrain import run

    exported = output / "pretrain" / "pretrained"
    marker = output / "pretrain" / "ablation_steps.txt"
    if (exported / "config.json").is_file():
        done = int(marker.read_text()) if marker.is_file() else None
        if done != steps:
            raise ValueError(f"{exported} holds a pretraining of {done or 'unknown'} steps, not {steps}; "
                             "choose another --output")
        print(f"using the pretraining already in {exported} ({steps} steps)", flush=True)
        return str(exported)
    config = load_config(None, [
        "model.bert=default", "model.num_region_classes=25", MODEL_OVERRIDES,
        f"data.prepare_default={output / 'default-data'}", "data.mode=resampled", "data.samples_per_epoch=3000",
        "data.vl_per_batch=16", "data.text_per_batch=16", "data.num_workers=1", "optimizer.lr=2e-4",
        "optimizer.warmup_steps=30", "optimizer.fresh_lr_multiplier=10", f"train.steps={steps}",
        "train.log_every=50", f"train.output_dir={output / 'pretrain'}", f"checkpoint.every={steps}",
        "checkpoint.keep=1", "tracking.experiment=vlbert_ds-ablation-pretrain",
        *(o for o in overrides if takes_key(PretrainConfig, o))], PretrainConfig)
    ensure_default(config.data.prepare_default, default_bert())
    result = run(config, discover(), grounding_words=GROUNDING_WORDS)
    marker.write_text(str(steps))
    return str(result.export_dir)


def run_ablation(output: str, init: str | None, budget: Budget = QUICK, overrides: list[str] = ()) -> int:
    """Overrides apply to the pretraining and to every fine-tuning run alike (each gets the keys its
    command takes; a key neither takes is an error)."""
    from vlbert_ds.prep.synthetic_tasks import prepare_synthetic_tasks, synthetic_ready
    from vlbert_ds.train.finetune import METRIC_NAMES, finetune

    for override in overrides:
        if not (takes_key(PretrainConfig, override) or takes_key(FinetuneConfig, override)):
            load_config(None, [override], FinetuneConfig)  # raises, naming the key
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "tasks"
    scenes = {"train_scenes": budget.train_scenes, "val_scenes": budget.val_scenes}
    made = json.loads((data / "scenes.json").read_text()) if (data / "scenes.json").is_file() else None
    if not synthetic_ready(str(data), ("vqa", "vcr", "refcoco")) or made != scenes:
        print(f"writing the synthetic tasks into {data} ...", flush=True)
        shutil.rmtree(data, ignore_errors=True)  # ours: no shards of another budget may stay behind
        for summary in prepare_synthetic_tasks(str(data), overwrite=True, **scenes):
            print(summary.table(), flush=True)
        (data / "scenes.json").write_text(json.dumps(scenes))
    init = init or pretrain_for_ablation(out, budget.pretrain_steps, overrides)

    results: dict[str, dict[str, float]] = {name: {} for name, _, _ in RUNS}
    predictions: dict[tuple[str, str], dict[str, bool]] = {}
    for name, task, mode in RUNS:
        for which in INITS:
            run_dir = out / f"{task}-{mode}-{which}" if task == "vcr" else out / f"{task}-{which}"
            config = load_config(None, [
                f"task.name={task}", f"task.train={data / task / 'train'}", f"task.val={data / task / 'val'}",
                f"task.init={init if which == 'pretrained' else ''}", f"task.vcr_mode={mode}",
                "task.batch_size=16" if task != "vcr" else "task.batch_size=8",
                "model.bert=default", "model.num_region_classes=25", MODEL_OVERRIDES,
                "optimizer.lr=1e-4", "optimizer.warmup_steps=15", "optimizer.fresh_lr_multiplier=10",
                f"train.steps={budget.finetune_steps}", "train.log_every=0", "data.num_workers=1",
                f"train.output_dir={run_dir}", f"checkpoint.every={budget.finetune_steps}", "checkpoint.keep=1",
                "checkpoint.resume=false", "checkpoint.export=false", "tracking.experiment=vlbert_ds-ablation",
                f"tracking.run_name={task}-{mode}-{which}",
                *(o for o in overrides if takes_key(FinetuneConfig, o))], FinetuneConfig)
            print(f"\n== {name}: fine-tuning from {which} ({budget.finetune_steps} steps) ==", flush=True)
            result = finetune(config, discover())
            results[name][which] = result.final_metrics[f"val_{METRIC_NAMES[task]}"]
            predictions[(name, which)] = result.predictions
    joint = {}
    for which in INITS:
        q2a, qa2r = predictions[("VCR Q->A", which)], predictions[("VCR QA->R", which)]
        common = sorted(set(q2a) & set(qa2r))
        joint[which] = sum(q2a[k] and qa2r[k] for k in common) / max(1, len(common))
    results["VCR Q->AR"] = joint
    write_report(out, results, init, budget)
    return 0


def write_report(out: Path, results: dict[str, dict[str, float]], init: str, budget: Budget) -> None:
    names = [n for n in ("VQA", "VCR Q->A", "VCR QA->R", "VCR Q->AR", "RefCOCO+") if n in results]
    lines = ["| task (synthetic, val) | pretrained VL-BERT | BERT only | gain |", "|---|---|---|---|"]
    for name in names:
        a, b = results[name]["pretrained"], results[name]["bert_only"]
        lines.append(f"| {name} | {100 * a:.1f} | {100 * b:.1f} | {100 * (a - b):+.1f} |")
    table = "\n".join(lines)
    verdict = [f"- {n}: pretrained {'beats' if results[n]['pretrained'] > results[n]['bert_only'] else 'does NOT beat'}"
               f" BERT-only" for n in names]
    text = (f"# Fine-tuning ablation (synthetic tasks)\n\nPretrained weights: `{init}` (budget: "
            f"{budget.pretrain_steps} pretraining steps unless given with --init). Same recipe, "
            f"{budget.finetune_steps} fine-tuning steps, same seed for both. Metric: VQA accuracy (VQA), "
            f"accuracy (VCR), accuracy of the top box at IoU >= 0.5 (RefCOCO+), in %.\n\n{table}\n\n"
            + "\n".join(verdict) + "\n")
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"results": results, "init": init,
                                                   "budget": budget.__dict__}, indent=1))
    import matplotlib  # after the table and JSON: a plotting failure loses nothing measured

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    width = 0.38
    xs = range(len(names))
    ax.bar([x - width / 2 for x in xs], [100 * results[n]["pretrained"] for n in names], width,
           label="pretrained VL-BERT")
    ax.bar([x + width / 2 for x in xs], [100 * results[n]["bert_only"] for n in names], width, label="BERT only")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ablation.png")
    plt.close(fig)
    print("\n" + text + f"\nwritten: {out / 'ablation.md'}, {out / 'ablation.png'}", flush=True)
