"""What a DeepSpeed ZeRO step sends, counted: run under the DeepSpeed launcher on N ranks (gloo on CPU),
it records DeepSpeed's comms log over steps 2..k of a VL-BERT preset and writes, per collective,
the message bytes per step. `scale_model.py --measure-comm` launches it and compares with its model.

    DS_ACCELERATOR=cpu python -m deepspeed.launcher.runner --num_gpus 2 benchmarks/comm_probe.py \
        --preset tiny --stage 2 --out comm.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    import deepspeed
    from conftest import make_vl_batch
    from deepspeed.comm import comm as ds_comm

    from vlbert_ds.model import VLBertConfig, VLBertForPretraining

    torch.manual_seed(0)
    config = VLBertConfig.preset(args.preset)
    model = VLBertForPretraining(config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "train_batch_size": 4 * world, "bf16": {"enabled": True},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                 # the ZeRO settings we ship (ds_configs/zero1.json, zero2.json, zero3.json)
                 "zero_optimization": json.loads((ROOT / f"ds_configs/zero{args.stage}.json").read_text())[
                     "zero_optimization"],
                 "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    batch = make_vl_batch(config, rows_vl=2, rows_text=2, regions=6, seed=engine.global_rank)
    batch.mlm_labels = torch.where(batch.text_mask, batch.input_ids, torch.full_like(batch.input_ids, -1))
    counted = {}
    for step in range(args.steps):
        if step == 1:  # the first step sets buffers up: count from the second
            ds_comm.comms_logger.comms_dict.clear()
        loss = engine(batch).loss
        engine.backward(loss)
        engine.step()
    for op, sizes in ds_comm.comms_logger.comms_dict.items():
        counted[op] = {"calls_per_step": sum(v[0] for v in sizes.values()) / (args.steps - 1),
                       "message_bytes_per_step": sum(size * v[0] for size, v in sizes.items()) / (args.steps - 1)}
    if engine.global_rank == 0:
        parameters = sum(p.numel() for p in model.parameters())
        if args.stage == 3:
            parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        Path(args.out).write_text(json.dumps({"preset": args.preset, "stage": args.stage, "world_size": world,
                                              "parameters": parameters, "collectives": counted}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
