"""Reading, checking, resizing and re-encoding images (VL-BERT scale: short side 600, long side <= 1000)."""

from __future__ import annotations

import io
import warnings

import fsspec
import numpy as np
from PIL import Image, ImageOps

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
    """Decode to RGB as displayed, refusing degenerate sizes and decompression bombs before decoding pixels.

    The EXIF orientation is applied first: boxes in a manifest are drawn on the image as viewers show
    it (a phone's portrait photo is stored landscape with an orientation tag).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise SampleError("image_too_large", f"{width} x {height}")
            image.load()
            image = ImageOps.exif_transpose(image)
            width, height = image.size
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
    try:
        return to_rgb(image)
    except (ValueError, OSError) as err:
        raise SampleError("unreadable_image", f"mode {image.mode}: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from every mode Pillow opens, by value range rather than by clipping.

    Pillow's own `convert("RGB")` clips 16/32-bit integer images at 255 (a 16-bit PNG turns white) and
    drops alpha (transparent pixels show whatever colour they hold). Here high-bit-depth images are
    scaled to 0-255, float images taken as 0-1 (or 0-255 when larger), and transparency is composited
    on white, as img2dataset does.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if mode == "F":
            top = 1.0 if pixels.size and np.nanmax(pixels) <= 1.0 else 255.0
        elif mode == "I" and pixels.size and pixels.max() > 65535:
            top = float(pixels.max())
        else:
            top = 65535.0 if mode != "I" or (pixels.size and pixels.max() > 255) else 255.0
        gray = np.clip(np.nan_to_num(pixels) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info) \
        or (mode in ("L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


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
