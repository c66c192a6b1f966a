"""Re-run the main job's visual-grounding check on a finished run's exported weights.

    python benchmarks/regrade_grounding.py RUN_DIR DATA_DIR [--samples 300]

It builds the same held-out set as `vlbert-pretrain` (`<DATA_DIR>/vl/val`, the default scenes'
grounding words) and prints both accuracies; used to compare runs made on different shard formats.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlbert_ds.bundled import default_bert
from vlbert_ds.model import VLBertForPretraining
from vlbert_ds.prep.default import GROUNDING_WORDS
from vlbert_ds.train.grounding import build_grounding_set, evaluate_grounding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args(argv)
    model = VLBertForPretraining.from_pretrained(str(Path(args.run) / "pretrained"))
    grounding = build_grounding_set(str(Path(args.data) / "vl/val"), GROUNDING_WORDS, default_bert(),
                                    model.config.visual_front_end, model.config.num_region_classes,
                                    max_samples=args.samples)
    result = evaluate_grounding(model, grounding, torch.device("cpu"))
    print(json.dumps({"run": args.run, "data": args.data, "targets": grounding.targets, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
