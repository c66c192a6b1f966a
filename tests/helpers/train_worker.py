"""One rank of a test training run: `python train_worker.py SPEC.json` with RANK/WORLD_SIZE/... set.

SPEC: {"overrides": [...], "batches": "default-data folder" | null, "num_batches": N, "out": "result.json"}
With "batches", rank r of W trains on the fixed list B[r], B[W + r], ... built from the default data
(exact mode, one rank), so runs of different world sizes see exactly the same data per step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def fixed_batches(folder: str, count: int, tokenizer: str):
    from vlbert_ds.data import ExampleConfig, LoaderConfig, PretrainStream, SourceSpec

    config = LoaderConfig(vl_sources=[SourceSpec(f"{folder}/vl/train")],
                          text_sources=[SourceSpec(f"{folder}/text/train")],
                          tokenizer=tokenizer, mode="exact", vl_per_batch=4, text_per_batch=4, num_workers=1,
                          shuffle_buffer=8, example=ExampleConfig(num_region_classes=25))
    stream = iter(PretrainStream(config))
    return [next(stream).batch for _ in range(count)]


def add_extra_outputs(rank: int) -> None:
    """A model that returns one loss part and one accuracy the trainer has never heard of:
    `demo_part` = 0.5 on every rank; `demo_acc` 1.0 over 3 items on rank 0, 0.0 over 1 item elsewhere."""
    from vlbert_ds.model import VLBertForPretraining

    original = VLBertForPretraining.forward

    def forward(self, batch):
        out = original(self, batch)
        out.losses["demo_part"] = torch.tensor(0.5)
        out.metrics["demo_acc"] = torch.tensor(1.0 if rank == 0 else 0.0)
        out.metrics["demo_count"] = torch.tensor(3.0 if rank == 0 else 1.0)
        return out

    VLBertForPretraining.forward = forward


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from vlbert_ds.bundled import default_bert
    from vlbert_ds.cli.pretrain import pretrain
    from vlbert_ds.train.config import load_config
    from vlbert_ds.train.distributed import discover, exit_fast_on_error, init_distributed
    from vlbert_ds.train.pretrain import run

    dist = discover()
    config = load_config(spec.get("config"), spec["overrides"])
    init_distributed(dist, timeout_s=config.train.dist_timeout_s)
    if spec.get("extra_outputs"):
        add_extra_outputs(dist.rank)
    batches = None
    if spec.get("batches"):
        every = fixed_batches(spec["batches"], spec["num_batches"], default_bert())
        batches = iter(every[dist.rank :: dist.world_size])
    with exit_fast_on_error(dist):
        result = run(config, dist, batches=batches) if batches is not None else pretrain(config, dist)
    if dist.is_main:
        report = {"step_losses": result.step_losses, "final": result.final_metrics, "export_dir": result.export_dir,
                  "run_id": result.run_id, "tracking_uri": result.tracking_uri}
        if result.export_dir and spec.get("compare_export"):
            from vlbert_ds.model import VLBertForPretraining

            probe = fixed_batches(spec["compare_export"], 1, default_bert())[0]
            engine_model = result.engine.module.eval()
            loaded = VLBertForPretraining.from_pretrained(result.export_dir).eval()
            with torch.no_grad():
                a = engine_model.vlbert(probe).text_output
                b = loaded.vlbert(probe).text_output
            mask = probe.text_mask
            report["export_max_abs_diff"] = float((a[mask] - b[mask]).abs().max())
            if config.model.bert:  # how far the words moved from the BERT the run started from
                bert = VLBertForPretraining.from_bert(default_bert(), num_region_classes=25)
                trained = loaded.vlbert.embeddings.word_embeddings.weight
                report["export_vs_bert_max_abs_diff"] = float(
                    (trained - bert.vlbert.embeddings.word_embeddings.weight).abs().max())
        Path(spec["out"]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
