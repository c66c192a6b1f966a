"""Box geometry embedding, as the official `common/utils/bbox.py: coordinate_embeddings`.

⚠ Code, not paper: the paper embeds the corner coordinates (x_LT/W, y_LT/H, x_RB/W, y_RB/H); the
released code (and so the released weights) embeds centre and size scaled to 0..100, with
wavelengths 1000^(i/256). We follow the code.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_geometry_embedding(
    boxes: Tensor, image_size: Tensor, wave_dim: int = 256, wave_base: float = 1000.0
) -> Tensor:
    """Embed boxes (…, 4) in pixels given their frame size (…, 2) = (W, H) into (…, 4 * 2 * wave_dim).

    Per coordinate p in [100*xc/W, 100*yc/H, 100*w/W, 100*h/H]: sin(p / f_i) for i < wave_dim,
    then cos(p / f_i), with f_i = wave_base ** (i / wave_dim); the four 2*wave_dim blocks are
    concatenated in that order.
    """
    boxes = boxes.float()
    width = image_size[..., 0:1].float()
    height = image_size[..., 1:2].float()
    x1, y1, x2, y2 = boxes.unbind(-1)
    centre_size = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)
    scale = torch.cat((width, height, width, height), dim=-1)
    position = centre_size / scale * 100.0  # (…, 4)
    freqs = wave_base ** (torch.arange(wave_dim, dtype=torch.float32, device=boxes.device) / wave_dim)
    angles = position.unsqueeze(-1) / freqs  # (…, 4, wave_dim)
    embedding = torch.cat((angles.sin(), angles.cos()), dim=-1)  # (…, 4, 2 * wave_dim)
    return embedding.flatten(-2)


def box_iou_pixels(boxes: Tensor, others: Tensor) -> Tensor:
    """IoU [N, M] of pixel-inclusive boxes (x1..x2 covers x2 - x1 + 1 pixels), as Caffe and the official
    code count them; the one IoU of the package (task labels, the RefCOCO+ metric, Caffe NMS agree)."""
    from torchvision.ops import box_iou

    shift = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
    return box_iou(boxes.float() + shift, others.float().to(boxes.device) + shift)
