"""`vlbert-prep regions`: images of a caption manifest -> region files that `vlbert-prep captions --regions` reads.

One detector pass over the manifest's images writes `regions-NNNNNN.tsv` files in the
bottom-up-attention layout with the class distribution as a 7th column (`image_id, image_w,
image_h, num_boxes, boxes, features, cls_prob`, base64 float32), keyed by the row's `image_id`, or
its `image` reference when it has none. Each file is written atomically and then committed by
`regions-NNNNNN_stats.json`, which records a digest of its rows and of the detector (spec, weights
file content, input sizes): a re-run skips finished files, refuses files made from other input
(`--overwrite` redoes them), and removes temporary files a killed run left. Images that cannot be
read are skipped and counted by reason, as in the rest of prep; so are images where the detector
keeps no box at all (`no_regions`: smaller than the bottom-up-attention detector's 16-pixel minimum
proposal, as in Caffe's proposal layer).

Images are read as `vlbert-prep captions` reads them (EXIF orientation, every mode to RGB, the same
local-file guard), batched by aspect ratio, and run on the GPU when one is present (CPU otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from vlbert_ds.data import storage
from vlbert_ds.data.schema import SampleError
from vlbert_ds.prep.captions import CaptionRow, image_bytes_and_caption
from vlbert_ds.prep.images import open_image
from vlbert_ds.prep.img2dataset import Img2DatasetFiles, Img2DatasetRow
from vlbert_ds.prep.parts import (
    SUMMARY_NAME,
    WHOLE,
    Part,
    build_plan,
    check_against_other_parts,
    check_complete,
    is_done,
    mark_done,
    record_plan,
    unmark_done,
)
from vlbert_ds.prep.regions import regions_name, regions_stats_name
from vlbert_ds.prep.writer import ShardJob, canonical, existing_files, key_value_table, plan_resume

_REGION_FILE = r"^regions-(\d{6})(\.tsv|_stats\.json)$"


@dataclass
class RegionsSummary:
    out: str
    part: Part = WHOLE
    files_total: int = 0
    files_written: int = 0
    files_already_done: int = 0
    images: int = 0
    boxes: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [("output", self.out),
                *([("part", f"{self.part} (run vlbert-prep finalize when every part is done)")]
                  if self.part.count > 1 else []),
                ("region files", f"{self.files_total} ({self.files_written} written, "
                                                        f"{self.files_already_done} already done)"),
                ("images with regions (this run)", f"{self.images:,}"), ("boxes (this run)", f"{self.boxes:,}"),
                ("images skipped", f"{sum(self.skipped.values()):,}"),
                *[(f"  {reason}", f"{count:,}") for reason, count in sorted(self.skipped.items())],
                ("time", f"{self.seconds:,.1f} s"),
                ("throughput", f"{self.images / max(self.seconds, 1e-9):,.2f} images/s")]
        return key_value_table(rows)


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode()


def region_key(row: CaptionRow | Img2DatasetRow) -> str | None:
    """The key a row's regions are stored and looked up under: its image_id, else its image reference
    (the img2dataset key for img2dataset rows)."""
    if isinstance(row, Img2DatasetRow):
        return row.key
    return row.image_id if row.image_id is not None else row.image


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _load_image(row: CaptionRow | Img2DatasetRow, image_root: str, allow_local: bool,
                files: Img2DatasetFiles) -> torch.Tensor:
    if isinstance(row, CaptionRow) and not row.malformed and region_key(row) is None:
        raise SampleError("missing_image", "a row needs an image to detect regions in")
    data, _, _ = image_bytes_and_caption(row, image_root, allow_local, files)
    image = open_image(data)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class Progress:
    """A tqdm bar on a terminal; a line every `every_s` seconds in a log (tqdm shows nothing there)."""

    def __init__(self, total: int, every_s: float = 30.0) -> None:
        self.bar = tqdm(total=total, unit="img", desc="vlbert-prep regions", leave=False, disable=None)
        self.total, self.done, self.every_s = total, 0, every_s
        self.start = self.last = time.time()

    def update(self, count: int) -> None:
        self.bar.update(count)
        self.done += count
        now = time.time()
        if self.bar.disable and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            print(f"vlbert-prep regions: {self.done:,}/{self.total:,} images, "
                  f"{self.done / max(now - self.start, 1e-9):.2f} images/s", flush=True)

    def close(self) -> None:
        self.bar.close()


def write_region_file(out: str, index: int, rows: list[CaptionRow | Img2DatasetRow], detector, image_root: str,
                      allow_local: bool, batch_size: int, device: torch.device, digest: str, progress: Progress,
                      files: Img2DatasetFiles | None = None) -> dict:
    """Detect regions in one file's worth of rows, write the TSV, then its stats (the commit marker)."""
    skipped: Counter = Counter()
    images: list[tuple[int, str, torch.Tensor]] = []
    files = files or Img2DatasetFiles()
    for position, row in enumerate(rows):
        try:
            images.append((position, str(region_key(row)), _load_image(row, image_root, allow_local, files)))
        except SampleError as err:
            skipped[err.reason] += 1
            progress.update(1)
    # Batches of similar aspect ratio pad least; rows are written back in manifest order.
    images.sort(key=lambda item: item[2].shape[2] / item[2].shape[1])
    lines: dict[int, str] = {}
    boxes_total = 0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        tensors = [img.to(device) for _, _, img in chunk]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            found = detector(tensors)
        for (position, key, img), regions in zip(chunk, found, strict=True):
            count = int(regions.boxes.shape[0])
            if count == 0:  # e.g. an image smaller than the detector's smallest proposal (16 pixels a side)
                skipped["no_regions"] += 1
                continue
            boxes_total += count
            lines[position] = "\t".join([key, str(img.shape[2]), str(img.shape[1]), str(count),
                                         _b64(regions.boxes.cpu().numpy()), _b64(regions.features.cpu().numpy()),
                                         _b64(regions.scores.cpu().numpy())])
        progress.update(len(chunk))
    payload = "".join(lines[p] + "\n" for p in sorted(lines)).encode()
    storage.write_atomic(storage.join(out, regions_name(index)), lambda handle: handle.write(payload))
    stats = {"file": regions_name(index), "rows": len(rows), "images": len(lines), "boxes": boxes_total,
             "skipped": dict(skipped), "input_digest": digest, "bytes": len(payload), "end_time": time.time()}
    storage.write_json_atomic(storage.join(out, regions_stats_name(index)), stats)
    return stats


def detector_provenance(detector_spec: str, min_size: int | None, max_size: int | None,
                        proposals: int) -> dict:
    """What makes the regions: the detector, its weights' SHA-256 and input sizes (the summary records it;
    every part of a folder must agree on it)."""
    from vlbert_ds.model.detector import parse_detector_spec

    kind, arch, weights = parse_detector_spec(detector_spec)
    return {"detector": f"{kind}:{arch}" if arch else kind, "weights": file_digest(weights) if weights else None,
            "min_size": min_size, "max_size": max_size, "proposals": proposals}


def file_jobs(rows: list, images_per_file: int) -> list[ShardJob]:
    """A manifest's rows in region files of `images_per_file` rows each."""
    return [ShardJob(i, rows[start : start + images_per_file], start)
            for i, start in enumerate(range(0, len(rows), images_per_file))]


def extract_regions(jobs: list[ShardJob], out: str, detector_spec: str, image_root: str = "",
                    allow_local: bool = False, batch_size: int = 4, device: str = "auto",
                    min_size: int | None = None, max_size: int | None = None, proposals: int = 300,
                    overwrite: bool = False, part: Part = WHOLE) -> RegionsSummary:
    """Write region file `job.index` for every job of `part` not done yet; a whole run then finalizes."""
    from vlbert_ds.model.detector import build_region_detector, parse_detector_spec

    start_time = time.time()
    kind, arch, _ = parse_detector_spec(detector_spec)
    options = detector_provenance(detector_spec, min_size, max_size, proposals)
    digests = {job.index: hashlib.sha256(json.dumps({"options": options, "first_row": job.first_row,
                                                     "rows": canonical(job.rows)}, sort_keys=True).encode()
                                         ).hexdigest() for job in jobs}
    storage.makedirs(out)
    plan = build_plan("regions", "regions", options,
                      {job.index: (job.part_group, digests[job.index], len(job.rows)) for job in jobs}, part.count,
                      provenance=options)
    own = {job.index: digests[job.index] for job in jobs if part.owns(job.part_group)}
    check_against_other_parts(out, part, plan, overwrite)
    todo, already_done = plan_resume(out, own, overwrite, regions_name, regions_stats_name, _REGION_FILE,
                                     others=set(digests) - set(own))
    record_plan(out, part, plan)
    summary = RegionsSummary(out=out, part=part, files_total=len(own), files_already_done=already_done)
    if todo:
        unmark_done(out, part)
        by_index = {job.index: job for job in jobs}
        target = pick_device(device)
        detector = build_region_detector(detector_spec, min_size, max_size, proposals).to(target)
        name = f"bottom-up-attention {detector.spec.backbone}" if kind == "bua" else f"torchvision {arch}"
        print(f"detector: {name} ({detector.num_classes} classes, {detector.feature_dim}-d features) on {target}",
              flush=True)
        progress = Progress(sum(len(by_index[i].rows) for i in todo))
        files = Img2DatasetFiles()
        for index in todo:
            stats = write_region_file(out, index, by_index[index].rows, detector, image_root, allow_local,
                                      batch_size, target, digests[index], progress, files)
            summary.files_written += 1
            summary.images += stats["images"]
            summary.boxes += stats["boxes"]
        files.close()
        progress.close()
    own_stats = [storage.read_json(storage.join(out, regions_stats_name(index))) for index in sorted(own)]
    for stats in own_stats:
        if stats is not None:
            summary.skipped.update(stats["skipped"])
    finished_before = not todo and is_done(out, part)  # a re-run with nothing to do changes no file
    if not finished_before:
        mark_done(out, part, sorted(own), {"rows": sum(s["rows"] for s in own_stats if s),
                                           "images": sum(s["images"] for s in own_stats if s)})
    if part.count == 1 and not (finished_before and storage.exists(storage.join(out, SUMMARY_NAME))):
        finalize_regions(out)
    summary.seconds = time.time() - start_time
    return summary


def finalize_regions(out: str) -> dict:
    """Check a regions folder whose parts are all done; write its `prep-summary.json`."""
    def outside_plan(planned: set[int]) -> list[str]:
        existing, _ = existing_files(out, _REGION_FILE)
        return sorted(name for index, names in existing.items() if index not in planned for name in names)

    finished = check_complete(out, regions_stats_name, regions_name, outside_plan)
    summary = {**finished.summary, "boxes": sum(s.get("boxes", 0) for s in finished.stats.values())}
    storage.write_json_atomic(storage.join(out, SUMMARY_NAME), summary)
    return summary
