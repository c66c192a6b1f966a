"""`vlbert-prep default`: the embedded default dataset, generated offline and deterministically.

Vision-language part: synthetic scenes of 2-3 coloured shapes (circle, square, triangle, diamond in
six colours) on a textured background, with exact boxes, a 25-way class distribution per box
(background + colour x shape; 0.8 on the true class, the rest on look-alikes, as a detector's soft
scores), and captions that name colours, shapes and spatial relations of two objects. A masked colour
or shape word can only be recovered from the image, which is what MLM with visual clues must learn.

Every box also carries a 2048-d "precomputed" feature from `PixelFeatures`, a fixed extractor that
reads the pixels of the box (foreground colour statistics, a coarse shape mask and a thumbnail,
projected by a fixed random matrix). It stands in for a detector's `pool5_flat`: a real function of
the image, so the precomputed path is exercised on image content, not on labels.

Text part: English paragraphs from Python's own documentation (`pydoc_data.topics`), segmented as
`vlbert-prep text` does.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlbert_ds.data import storage
from vlbert_ds.data.schema import Compaction, VLRecord, encode_vl
from vlbert_ds.prep.text import TextSegmentMaker, segment_windows
from vlbert_ds.prep.writer import PrepSummary, chunk, write_dataset

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
           "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle", "diamond")
# The caption words the image decides (colour, shape, relation): what the grounding check masks.
GROUNDING_WORDS = frozenset([*COLOURS, *SHAPES, "left", "right", "above", "below"])
COLOUR_NAMES = tuple(COLOURS)
NUM_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # class 0 = background
FEATURE_DIM = 2048


def class_index(colour: int, shape: int) -> int:
    return 1 + colour * len(SHAPES) + shape


def class_names() -> list[str]:
    return ["__background__"] + [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]


def soft_scores(colour: int, shape: int) -> np.ndarray:
    """0.8 on the true class, 0.1 spread over same-shape other colours, 0.1 over same-colour other shapes."""
    scores = np.zeros(NUM_CLASSES, dtype=np.float32)
    scores[class_index(colour, shape)] = 0.8
    for other in range(len(COLOURS)):
        if other != colour:
            scores[class_index(other, shape)] += 0.1 / (len(COLOURS) - 1)
    for other in range(len(SHAPES)):
        if other != shape:
            scores[class_index(colour, other)] += 0.1 / (len(SHAPES) - 1)
    return scores


@dataclass
class SceneObject:
    colour: int
    shape: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 (inclusive pixel extent)


def _relation(a: SceneObject, b: SceneObject) -> str:
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


def _describe(obj: SceneObject) -> str:
    return f"{COLOUR_NAMES[obj.colour]} {SHAPES[obj.shape]}"


TEMPLATES = (
    "{an_a} {a} {rel} {an_b} {b} .",
    "there is {an_a} {a} {rel} {an_b} {b} .",
    "the {a} is {rel} the {b} .",
    "a picture with {an_a} {a} {rel} {an_b} {b} .",
)


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def make_scene(seed: int, index: int, width: int, height: int) -> tuple[Image.Image, list[SceneObject], str]:
    rng = random.Random(f"vlbert_ds-default/{seed}/{index}")
    base = np.array([rng.randint(200, 245)] * 3, dtype=np.float32) + np.array([rng.randint(-8, 8) for _ in range(3)])
    noise = np.random.default_rng([seed, index]).normal(0, 6, (height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    objects: list[SceneObject] = []
    wanted = rng.randint(2, 3)
    short = min(width, height)
    for _ in range(200):
        if len(objects) == wanted:
            break
        size = rng.randint(short // 6, short // 3)
        x1, y1 = rng.randint(2, width - size - 3), rng.randint(2, height - size - 3)
        box = (x1, y1, x1 + size, y1 + size)
        if any(not (box[2] + 4 < o.box[0] or o.box[2] + 4 < box[0] or box[3] + 4 < o.box[1] or o.box[3] + 4 < box[1])
               for o in objects):
            continue
        colour, shape = rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES))
        fill = COLOURS[COLOUR_NAMES[colour]]
        if SHAPES[shape] == "circle":
            draw.ellipse(box, fill=fill)
        elif SHAPES[shape] == "square":
            draw.rectangle(box, fill=fill)
        elif SHAPES[shape] == "triangle":
            draw.polygon([(x1 + size / 2, y1), (x1, y1 + size), (x1 + size, y1 + size)], fill=fill)
        else:
            draw.polygon([(x1 + size / 2, y1), (x1 + size, y1 + size / 2), (x1 + size / 2, y1 + size),
                          (x1, y1 + size / 2)], fill=fill)
        objects.append(SceneObject(colour, shape, tuple(float(v) for v in box)))
    first, second = objects[0], objects[1]
    a, b = _describe(first), _describe(second)
    caption = rng.choice(TEMPLATES).format(a=a, b=b, an_a=_article(a), an_b=_article(b), rel=_relation(first, second))
    return image, objects, caption


class PixelFeatures:
    """A fixed extractor: box pixels -> 2048-d feature (see the module docstring)."""

    THUMB = 6
    MASK = 8

    def __init__(self, seed: int = 0) -> None:
        raw_dim = 3 + 3 * 8 + self.MASK * self.MASK + self.THUMB * self.THUMB * 3
        projection_rng = np.random.default_rng(seed)
        self.projection = projection_rng.normal(0, 1 / math.sqrt(raw_dim), (raw_dim, FEATURE_DIM)).astype(np.float32)

    def __call__(self, pixels: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        x1, y1, x2, y2 = (round(v) for v in box)
        crop = pixels[y1 : y2 + 1, x1 : x2 + 1].astype(np.float32) / 255.0
        border = np.concatenate((crop[0], crop[-1], crop[:, 0], crop[:, -1]))
        background = np.median(border, axis=0)
        foreground = np.abs(crop - background).sum(-1) > 0.25
        fg_pixels = crop[foreground] if foreground.any() else crop.reshape(-1, 3)
        hist = np.concatenate([np.histogram(fg_pixels[:, c], bins=8, range=(0, 1))[0] for c in range(3)])
        hist = hist / max(1, fg_pixels.shape[0])
        mask = np.asarray(Image.fromarray(foreground.astype(np.uint8) * 255).resize((self.MASK, self.MASK),
                                                                                    Image.Resampling.BILINEAR))
        thumb = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((self.THUMB, self.THUMB),
                                                                                 Image.Resampling.BILINEAR))
        raw = np.concatenate((fg_pixels.mean(0), hist, mask.reshape(-1) / 255.0, thumb.reshape(-1) / 255.0))
        return (raw.astype(np.float32) * 4.0) @ self.projection


class DefaultSceneMaker:
    """Row = scene index; picklable (numpy arrays only)."""

    def __init__(self, seed: int, width: int, height: int, quality: int = 90,
                 compaction: Compaction | None = None) -> None:
        self.seed, self.width, self.height, self.quality = seed, width, height, quality
        self.compaction = compaction or Compaction()
        self.features = PixelFeatures(seed=0)

    def __call__(self, index: int, shard: int, position: int) -> list[dict[str, Any]]:
        image, objects, caption = make_scene(self.seed, index, self.width, self.height)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.quality)
        jpeg = buffer.getvalue()
        pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))  # features of what the model will see
        boxes = np.array([o.box for o in objects], dtype=np.float32)
        record = VLRecord(key=f"{shard:06d}_{position:06d}", caption=caption, image_width=self.width,
                          image_height=self.height, boxes=boxes,
                          scores=np.stack([soft_scores(o.colour, o.shape) for o in objects]),
                          features=np.stack([self.features(pixels, o.box) for o in objects]), jpeg=jpeg)
        sample = encode_vl(record, self.compaction)
        meta = json.loads(sample["json"])
        meta["objects"] = [{"colour": COLOUR_NAMES[o.colour], "shape": SHAPES[o.shape]} for o in objects]
        meta["scene_index"] = index
        sample["json"] = json.dumps(meta).encode()
        return [sample]


def english_paragraphs() -> list[str]:
    """Paragraphs of English prose from Python's bundled documentation topics."""
    from pydoc_data.topics import topics

    paragraphs = []
    for text in topics.values():
        for block in text.split("\n\n"):
            line = " ".join(block.split())
            if len(line.split()) >= 8 and line[:1].isalpha() and not line.startswith(("class ", "def ")):
                paragraphs.append(line)
    return paragraphs


def prepare_default(out: str, tokenizer: str, num_images: int = 3000, num_val_images: int = 300,
                    num_text_segments: int = 3000, width: int = 320, height: int = 240,
                    samples_per_shard: int = 250, seed: int = 0, processes: int = 2,
                    overwrite: bool = False, compaction: Compaction | None = None) -> list[PrepSummary]:
    """Write `out/vl/train`, `out/vl/val`, `out/text/train` and `out/classes.json`."""
    storage.makedirs(out)
    maker = DefaultSceneMaker(seed, width, height, compaction=compaction)
    summaries = [
        write_dataset(storage.join(out, "vl/train"), list(chunk(range(num_images), samples_per_shard)), maker,
                      "vl", processes, overwrite),
        write_dataset(storage.join(out, "vl/val"),
                      list(chunk(range(num_images, num_images + num_val_images), samples_per_shard)), maker, "vl",
                      processes, overwrite),
    ]
    windows = segment_windows(english_paragraphs())
    rng = random.Random(seed)
    if num_text_segments < len(windows):
        windows = [windows[i] for i in sorted(rng.sample(range(len(windows)), num_text_segments))]
    summaries.append(write_dataset(storage.join(out, "text/train"), list(chunk(windows, samples_per_shard * 2)),
                                   TextSegmentMaker(tokenizer), "text", processes, overwrite))
    storage.write_json_atomic(storage.join(out, "classes.json"),
                              {"num_classes": NUM_CLASSES, "names": class_names(), "source": "vlbert-prep default",
                               "seed": seed, "image_size": [width, height]})
    return summaries


def ensure_default(out: str, tokenizer: str, processes: int = 2) -> bool:
    """Prepare the embedded default into `out` unless it is there (its text split is written last);
    prints the tables. Returns whether it wrote anything."""
    if storage.exists(storage.join(out, "text/train/sizes.json")):
        return False
    print(f"preparing the embedded default data in {out} ...", flush=True)
    for summary in prepare_default(out, tokenizer, processes=processes):
        print(summary.table(), flush=True)
    return True
