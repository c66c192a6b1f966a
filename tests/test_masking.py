"""Masking statistics match the reference probabilities (binomial tolerance), truncation matches the official loop."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vlbert_ds.data.masking import IGNORE, MaskingConfig, mask_regions, mask_words, truncation_lengths

MASK_ID = 103
REPLACEMENTS = np.arange(1000, 30000)


def within(observed: int, total: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(observed / total - p) <= sigmas * math.sqrt(p * (1 - p) / total)


def test_whole_word_masking_rates():
    rng = np.random.default_rng(0)
    config = MaskingConfig()
    words = selected = as_mask = as_random = kept = 0
    for _ in range(3000):
        lengths = rng.integers(1, 4, size=20)  # 20 words of 1-3 pieces
        ids = rng.integers(1000, 30000, size=int(lengths.sum()))
        starts = np.zeros(ids.size, dtype=bool)
        starts[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = True
        out, labels = mask_words(ids, starts, rng, MASK_ID, REPLACEMENTS, config)
        bounds = np.concatenate(([0], np.cumsum(lengths)))
        for a, b in itertools.pairwise(bounds):
            words += 1
            word_labels = labels[a:b]
            assert (word_labels == IGNORE).all() or (word_labels == ids[a:b]).all()  # whole word, all labelled
            if word_labels[0] == IGNORE:
                assert (out[a:b] == ids[a:b]).all()
                continue
            selected += 1
            if (out[a:b] == MASK_ID).all():
                as_mask += 1
            elif (out[a:b] == ids[a:b]).all():
                kept += 1
            else:
                as_random += 1
                assert not (out[a:b] == MASK_ID).any()
    assert within(selected, words, 0.15)
    assert within(as_mask, selected, 0.8)
    assert within(kept, selected, 0.1)
    assert within(as_random, selected, 0.1)


def test_region_masking_rates():
    rng = np.random.default_rng(1)
    selected, hidden = mask_regions(200_000, rng, MaskingConfig())
    assert within(int(selected.sum()), selected.size, 0.15)
    assert within(int(hidden.sum()), int(selected.sum()), 0.9)
    assert not (hidden & ~selected).any()


@pytest.mark.parametrize(("text", "boxes", "budget", "expected"), [
    (12, 60, 64, (12, 52)),  # a 12-token caption keeps 52 boxes (reference §2.4)
    (40, 40, 64, (32, 32)),
    (70, 1, 64, (63, 1)),
    (5, 20, 64, (5, 20)),  # fits: untouched
    (33, 34, 64, (32, 32)),
])
def test_truncation_follows_the_official_loop(text, boxes, budget, expected):
    assert truncation_lengths(text, boxes, budget) == expected
