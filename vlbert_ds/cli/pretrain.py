"""`vlbert-pretrain`: VL-BERT pretraining on a DeepSpeed ZeRO engine.

    vlbert-pretrain --config configs/default.yaml [section.key=value ...]

Launch one process per device (launch/local.sh, launch/slurm/pretrain.sbatch, torchrun or the
deepspeed launcher); rank discovery is in `vlbert_ds.train.distributed`.
"""

from __future__ import annotations

import os

from vlbert_ds.bundled import default_bert
from vlbert_ds.cli.common import launch, load_or_exit, parser_for
from vlbert_ds.train.config import PretrainConfig
from vlbert_ds.train.distributed import DistEnv


def prepare_default_data(config: PretrainConfig, dist: DistEnv) -> None:
    """Write the embedded default (rank 0) if `data.prepare_default` names a folder without it."""
    import torch.distributed as tdist

    from vlbert_ds.prep.default import ensure_default

    if not config.data.prepare_default:
        return
    if dist.is_main:
        ensure_default(config.data.prepare_default, default_bert(), processes=max(1, os.cpu_count() or 1))
    if tdist.is_initialized():
        tdist.barrier()


def pretrain(config: PretrainConfig, dist: DistEnv):
    """The default data when asked for, then the pretraining recipe (with the default scenes' grounding words)."""
    from vlbert_ds.prep.default import GROUNDING_WORDS
    from vlbert_ds.train.pretrain import run

    prepare_default_data(config, dist)
    return run(config, dist, grounding_words=GROUNDING_WORDS)


def main(argv: list[str] | None = None) -> int:
    from vlbert_ds.train.pretrain import print_summary

    args = parser_for(PretrainConfig, __doc__.splitlines()[0]).parse_args(argv)
    config = load_or_exit(PretrainConfig, args.config, args.overrides)
    if isinstance(config, int):
        return config
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    return launch(config, lambda dist: pretrain(config, dist), print_summary)


if __name__ == "__main__":
    raise SystemExit(main())
