"""Reading, checking, resizing and re-encoding images (VL-BERT scale: short side 600, long side <= 1000)."""

from __future__ import annotations

import io
import warnings

import fsspec
import numpy as np
from PIL import Image

from vlbert_ds.data.schema import SampleError

# The official CC check drops images with a side under 10 px or over 10000 px.
MIN_SIDE, MAX_SIDE = 10, 10000
MAX_PIXELS = 100_000_000


def read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as handle:
            return handle.read()
    except FileNotFoundError as err:
        raise SampleError("missing_file", url) from err
    except Exception as err:
        raise SampleError("unreadable_file", f"{url}: {type(err).__name__}: {err}") from err


def open_image(data: bytes) -> Image.Image:
    """Decode to RGB, refusing degenerate sizes and decompression bombs before decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise SampleError("image_too_large", f"{width} x {height}")
            image.load()
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SampleError("image_too_large", str(err)) from err
    except Exception as err:
        raise SampleError("unreadable_image", f"{type(err).__name__}: {err}") from err
    if min(width, height) < MIN_SIDE:
        raise SampleError("image_too_small", f"{width} x {height}")
    if max(width, height) > MAX_SIDE:
        raise SampleError("image_too_large", f"{width} x {height}")
    return image.convert("RGB")


def resize_scale(width: int, height: int, short_side: int, max_long_side: int) -> float:
    """The VL-BERT / Detectron rule: short side to `short_side` unless the long side would pass `max_long_side`."""
    return min(short_side / min(width, height), max_long_side / max(width, height))


def resize_and_encode(image: Image.Image, short_side: int, max_long_side: int, quality: int = 90
                      ) -> tuple[bytes, int, int, float]:
    """Return (jpeg bytes, width, height, scale applied to the original coordinates)."""
    width, height = image.size
    scale = resize_scale(width, height, short_side, max_long_side)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != (width, height):
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), new_size[0], new_size[1], new_size[0] / width


def check_boxes(boxes: np.ndarray, width: float, height: float, tolerance: float = 1.0) -> np.ndarray:
    """Boxes (K, 4) inside the image (within `tolerance` px, then clipped), x2 >= x1, y2 >= y1, finite."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise SampleError("nonfinite_boxes")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise SampleError("bad_boxes", "x2 < x1 or y2 < y1")
    if (boxes[:, :2] < -tolerance).any() or (boxes[:, 2] > width + tolerance).any() or \
            (boxes[:, 3] > height + tolerance).any():
        raise SampleError("boxes_out_of_range", f"outside {width} x {height}")
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width - 1)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height - 1)
    return boxes
