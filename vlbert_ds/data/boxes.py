"""The visual side of every row: boxes clipped to the image, after the whole-image RoI 0.

Pretraining rows, task rows and the grounding check all build it here, so RoI 0 is the same
`[0, 0, W-1, H-1]` (pixel-inclusive, as the official `im_info` boxes) everywhere.
"""

from __future__ import annotations

import numpy as np


def clip_to_image(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """A copy of `boxes` [R, 4] (x1, y1, x2, y2) with every corner inside the W x H image."""
    boxes = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width - 1)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height - 1)
    return boxes


def with_image_roi(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """[R + 1, 4] float32: the whole-image box, then `boxes` clipped to the image."""
    return np.concatenate(([[0.0, 0.0, width - 1, height - 1]], clip_to_image(boxes, width, height))).astype(
        np.float32)
