"""VL-BERT masking and truncation (reference §2.3-2.4, official `random_word_wwm`, `random_mask_region`).

* Words: each basic-tokenizer word is selected with p=0.15; all its WordPieces then become [MASK]
  (80%), independent random tokens (10%) or stay (10%), and all are labelled. Nothing forces a mask.
* RoIs: each detector box (never the whole-image RoI 0) is selected with p=0.15; 90% of the selected
  are hidden (learned feature / zeroed pixels + mask-[IMG]), 10% stay; all selected are predicted.
* Truncation to an element budget (default 64 = text incl. [CLS]/[SEP] + RoIs incl. RoI 0):
  shorten whichever of text and boxes is longer, keep >= 2 text tokens and >= 1 box, re-append [SEP].

Randomness comes from a `numpy.random.Generator` the caller seeds per sample, so a sample is masked
the same way whichever worker or rank reads it (needed for exact resume).
Deviation: random replacement tokens are drawn from the non-special vocabulary (the official code
draws from the whole vocabulary, [PAD]/[CLS]/[SEP]/[MASK] and [unusedN] included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -1


@dataclass(frozen=True)
class MaskingConfig:
    word_probability: float = 0.15
    mask_token_fraction: float = 0.8  # of selected words
    random_token_fraction: float = 0.1  # of selected words; the rest stay unchanged
    region_probability: float = 0.15
    region_hide_fraction: float = 0.9  # of selected RoIs


def mask_words(
    ids: np.ndarray, word_starts: np.ndarray, rng: np.random.Generator, mask_id: int,
    replacement_ids: np.ndarray, config: MaskingConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Whole-word masking of WordPiece `ids`; `word_starts[i]` is True where a new word begins.

    Returns (input ids, labels) with labels = original id at every piece of a selected word, -1 elsewhere.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return ids.copy(), np.full(0, IGNORE, dtype=np.int64)
    starts = np.asarray(word_starts, dtype=bool).copy()
    starts[0] = True
    word_of_piece = np.cumsum(starts) - 1
    num_words = int(word_of_piece[-1]) + 1
    draws = rng.random(num_words)
    selected_word = draws < config.word_probability
    action = draws / config.word_probability  # uniform in [0, 1) for the selected words, as the official code
    as_mask = selected_word & (action < config.mask_token_fraction)
    as_random = selected_word & ~as_mask & (action < config.mask_token_fraction + config.random_token_fraction)

    piece_selected = selected_word[word_of_piece]
    out = ids.copy()
    out[as_mask[word_of_piece]] = mask_id
    random_pieces = as_random[word_of_piece]
    if random_pieces.any():
        out[random_pieces] = replacement_ids[rng.integers(0, replacement_ids.size, int(random_pieces.sum()))]
    labels = np.where(piece_selected, ids, IGNORE)
    return out, labels


def mask_regions(num_boxes: int, rng: np.random.Generator, config: MaskingConfig) -> tuple[np.ndarray, np.ndarray]:
    """(selected, hidden) over detector boxes (RoI 0 excluded by the caller)."""
    draws = rng.random(num_boxes)
    selected = draws < config.region_probability
    hidden = selected & (draws / config.region_probability < config.region_hide_fraction)
    return selected, hidden


def truncation_lengths(text_len: int, box_len: int, budget: int) -> tuple[int, int]:
    """The official rule: drop from the longer side until text + boxes fit the budget."""
    if text_len + box_len <= budget:
        return text_len, box_len
    keep_text, keep_box = text_len, box_len
    while keep_text + keep_box > budget and keep_text > 0 and keep_box > 0:
        if keep_box > keep_text:
            keep_box -= 1
        else:
            keep_text -= 1
    return max(keep_text, 2), max(keep_box, 1)
