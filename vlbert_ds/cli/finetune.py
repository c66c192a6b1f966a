"""`vlbert-finetune`: VQA, VCR or RefCOCO+ on the same DeepSpeed engine, checkpoints and MLflow as pretraining.

    vlbert-finetune --task vqa --config FILE --init PRETRAINED [section.key=value ...]
    vlbert-finetune --task all --quick [--init PRETRAINED]     # synthetic tasks, pretrained vs BERT-only

`--init` is a pretraining `save_pretrained` folder (`<output_dir>/pretrained` of vlbert-pretrain);
without it the model starts from `model.bert` alone (the "no pretraining" baseline). `--task all
--quick` is `vlbert_ds.experiments.ablation`.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from vlbert_ds.cli.common import launch, load_or_exit, parser_for
from vlbert_ds.train.config import FinetuneConfig

# `--task all` budget parts (fields of ablation.Budget) that a flag of the same name overrides.
BUDGET_FLAGS = {"pretrain_steps": "pretraining steps", "finetune_steps": "fine-tuning steps per run",
                "train_scenes": "synthetic training scenes per task",
                "val_scenes": "synthetic validation scenes per task"}


def run_ablation_command(args) -> int:
    from vlbert_ds.experiments.ablation import FULL, QUICK, run_ablation
    from vlbert_ds.train.distributed import discover, init_distributed, setup_process

    dist = discover()
    setup_process(dist)
    if dist.world_size != 1:
        print("vlbert-finetune --task all runs in one process", file=sys.stderr)
        return 2
    chosen = {name: getattr(args, name) for name in BUDGET_FLAGS if getattr(args, name) is not None}
    if any(v < 1 for v in chosen.values()):
        print("vlbert-finetune: budget values must be >= 1", file=sys.stderr)
        return 2
    init_distributed(dist)
    try:
        return run_ablation(args.output, args.init, replace(QUICK if args.quick else FULL, **chosen), args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"vlbert-finetune: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from vlbert_ds.train.finetune import finetune, print_summary

    parser = parser_for(FinetuneConfig, __doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=["vqa", "vcr", "refcoco", "all"])
    parser.add_argument("--init", default=None, help="pretrained save_pretrained folder (task.init)")
    parser.add_argument("--quick", action="store_true", help="with --task all: the synthetic ablation")
    parser.add_argument("--output", default="runs/finetune-ablation", help="with --task all")
    for name, what in BUDGET_FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"with --task all: {what} (default: the budget's)")
    args = parser.parse_args(argv)
    if args.task == "all":
        return run_ablation_command(args)
    overrides = [f"task.name={args.task}", *([f"task.init={args.init}"] if args.init else []), *args.overrides]
    config = load_or_exit(FinetuneConfig, args.config, overrides)
    if isinstance(config, int):
        return config
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    return launch(config, lambda dist: finetune(config, dist), lambda result: print_summary(result, config))


if __name__ == "__main__":
    raise SystemExit(main())
