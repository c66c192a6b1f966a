"""The geometry embedding equals the official formula, computed here independently with `math`."""

from __future__ import annotations

import math

import torch

from vlbert_ds.model import box_geometry_embedding


def reference_embedding(box, width, height, wave_dim=256, base=1000.0):
    x1, y1, x2, y2 = box
    coords = [100 * (x1 + x2) / 2 / width, 100 * (y1 + y2) / 2 / height, 100 * (x2 - x1) / width,
              100 * (y2 - y1) / height]
    out = []
    for p in coords:
        freqs = [base ** (i / wave_dim) for i in range(wave_dim)]
        out += [math.sin(p / f) for f in freqs]
        out += [math.cos(p / f) for f in freqs]
    return out


def test_geometry_matches_formula_for_several_boxes():
    boxes = [(0.0, 0.0, 599.0, 399.0), (10.5, 20.0, 110.0, 220.25), (300.0, 5.0, 301.0, 6.0)]
    sizes = [(600.0, 400.0), (640.0, 480.0), (1000.0, 600.0)]
    got = box_geometry_embedding(torch.tensor(boxes, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64))
    assert got.shape == (3, 2048)
    for row, (box, (width, height)) in enumerate(zip(boxes, sizes, strict=True)):
        expected = torch.tensor(reference_embedding(box, width, height))
        assert (got[row].double() - expected).abs().max().item() < 1e-5


def test_geometry_layout_is_sin_block_then_cos_block_per_coordinate():
    emb = box_geometry_embedding(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([[100.0, 100.0]]))
    # coordinate 0 is x-centre = 25 -> 25% -> first element sin(25/1), element 256 cos(25/1)
    assert abs(emb[0, 0].item() - math.sin(25.0)) < 1e-6
    assert abs(emb[0, 256].item() - math.cos(25.0)) < 1e-6
    # coordinate 2 is width 50% -> block starts at 2 * 512
    assert abs(emb[0, 1024].item() - math.sin(50.0)) < 1e-6
