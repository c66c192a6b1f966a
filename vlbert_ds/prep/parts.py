"""Preparation in parts: N invocations (GPUs, nodes, Slurm array tasks) write disjoint files of one folder.

Every prep command plans its whole output first: which output files there are, the input rows of each
and their digest (`writer.job_digest`), and a *group* per file: the input shard it reads (img2dataset),
or else the file's own index. Part I of N (`--part I/N`, 0-based as `SLURM_ARRAY_TASK_ID`) writes the
files whose group is I mod N, so a tar of img2dataset output is read by one part only and no two parts
ever write the same file. Planning reads the input's metadata only (parquet row counts and statuses,
manifest rows), which is small beside the work it splits.

Each part records what it planned in `_parts/plan-I-of-N.json` before it writes anything, and refuses
to start when another part's plan differs (other options, tokenizer, detector weights, input), naming
what differs. It writes `_parts/done-I-of-N.json` when every file it owns is committed; each part
resumes on its own (finished files are kept, by their digests, as a one-part run resumes).

`vlbert-prep finalize OUT` then checks that every part is done, that all plans agree, and that every
planned file is committed from the planned input, and only then writes `sizes.json` and the dataset
summary (`prep-summary.json`). Training refuses a folder of parts before that (`data.storage`). A
run without `--part` is part 0 of 1 and finalizes itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from vlbert_ds.data import storage

PLAN_FORMAT = 1
SUMMARY_NAME = "prep-summary.json"


@dataclass(frozen=True)
class Part:
    """Part `index` of `count` (0-based)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Part:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not match:
            raise ValueError(f"--part {text!r}: expected I/N, e.g. --part 0/8 for the first of 8 parts")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise ValueError(f"--part {text}: the number of parts must be >= 1")
        if index >= count:
            raise ValueError(f"--part {text}: the part index must be in 0..{count - 1} (0-based, as "
                             "SLURM_ARRAY_TASK_ID)")
        return cls(index, count)

    def owns(self, group: int) -> bool:
        return group % self.count == self.index

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Part(0, 1)


def plan_path(out: str, part: Part) -> str:
    return storage.join(storage.join(out, storage.PARTS_DIR), f"plan-{part.label}.json")


def done_path(out: str, part: Part) -> str:
    return storage.join(storage.join(out, storage.PARTS_DIR), f"done-{part.label}.json")


def build_plan(layout: str, kind: str, options: Any, files: dict[int, tuple[int, str, int]], parts: int,
               provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every part must agree on: the output files (index -> group, input digest, rows), the options
    that shape them (by digest) and where the features come from."""
    options_text = json.dumps(options, sort_keys=True, default=repr)
    return {"format": PLAN_FORMAT, "layout": layout, "kind": kind, "parts": parts,
            "options_sha256": hashlib.sha256(options_text.encode()).hexdigest(),
            "provenance": provenance or {},
            "files": {str(i): {"group": g, "input_digest": d, "rows": r} for i, (g, d, r) in sorted(files.items())}}


def _differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    found = []
    for key, what in (("layout", "the output layout"), ("kind", "the kind of data"), ("parts", "the number of parts"),
                      ("options_sha256", "the options (tokenizer, sizes, compaction, ...)"),
                      ("provenance", "the detector or its weights")):
        if mine.get(key) != theirs.get(key):
            found.append(f"{what} ({theirs.get(key)!r} there, {mine.get(key)!r} here)"
                         if key in ("parts", "kind", "layout") else what)
    if mine.get("files") != theirs.get("files"):
        ours, other = mine.get("files", {}), theirs.get("files", {})
        if len(ours) != len(other):
            found.append(f"the input ({len(other)} output files planned there, {len(ours)} here)")
        else:
            changed = [i for i in ours if ours[i] != other.get(i)]
            example = changed[0] if changed else "?"
            found.append(f"the input rows of {len(changed)} output file(s) (e.g. file {example})")
    return found


def check_against_other_parts(out: str, part: Part, plan: dict[str, Any], overwrite: bool = False) -> None:
    """ValueError when another part of `out` planned other settings or other input (nothing is written);
    with `overwrite`, those parts' markers are removed instead (they must run again)."""
    markers = storage.part_markers(out)
    for other, count in sorted(markers["plan"].items()):
        if (other, count) == (part.index, part.count):
            continue
        theirs = storage.read_json(plan_path(out, Part(other, count)))
        differs = _differences(plan, theirs or {})
        if differs and overwrite:
            remove_markers(out, Part(other, count))
        elif differs:
            raise ValueError(f"{out}: part {other}/{count} was prepared with other settings: "
                             + "; ".join(differs) + ". Every part of a folder needs the same command apart from "
                             "--part; use another --out, or --overwrite to redo the folder from this input")


def record_plan(out: str, part: Part, plan: dict[str, Any]) -> None:
    """Write this part's plan (unless the same plan is there: a finished re-run changes no file)."""
    recorded = {**plan, "part": part.index}
    if storage.read_json(plan_path(out, part)) == json.loads(json.dumps(recorded)):
        return
    storage.makedirs(storage.join(out, storage.PARTS_DIR))
    storage.write_json_atomic(plan_path(out, part), recorded)


def is_done(out: str, part: Part) -> bool:
    return storage.exists(done_path(out, part))


def mark_done(out: str, part: Part, files: list[int], counts: dict[str, Any]) -> None:
    storage.write_json_atomic(done_path(out, part), {"part": part.index, "parts": part.count, "files": files,
                                                     "host": socket.gethostname(), "finished": time.time(),
                                                     **counts})


def _remove(*urls: str) -> None:
    import fsspec

    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            fs.rm(path)


def remove_markers(out: str, part: Part) -> None:
    _remove(plan_path(out, part), done_path(out, part))


def unmark_done(out: str, part: Part) -> None:
    """This part has work to do again: its completion marker, and the folder's finalization, no longer hold."""
    _remove(done_path(out, part), storage.join(out, storage.SIZES_NAME), storage.join(out, SUMMARY_NAME))


@dataclass
class Finalized:
    """The checked state of a finished folder: the plan, each file's stats, and the totals."""

    out: str
    plan: dict[str, Any]
    stats: dict[int, dict[str, Any]]
    summary: dict[str, Any]


def check_complete(out: str, stats_name, file_names, extra_files) -> Finalized:
    """Every part done, all plans equal, every planned file committed from its planned input, nothing
    else beside them. `stats_name(i)` names file i's commit marker, `file_names(i)` its files,
    `extra_files(planned)` lists committed files outside the plan. ValueError says what is wrong."""
    markers = storage.part_markers(out)
    if not markers["plan"]:
        raise ValueError(f"{out}: nothing to finalize (no {storage.PARTS_DIR}/ plans: was it prepared with "
                         "vlbert-prep?)")
    counts = set(markers["plan"].values()) | set(markers["done"].values())
    if len(counts) > 1:
        raise ValueError(f"{out}: parts of different splits ({', '.join(f'N={c}' for c in sorted(counts))}) are mixed "
                         f"in {storage.PARTS_DIR}/; every part of one folder needs the same N")
    count = counts.pop()
    not_started = [i for i in range(count) if i not in markers["plan"]]
    unfinished = [i for i in range(count) if i in markers["plan"] and i not in markers["done"]]
    if not_started or unfinished:
        problems = []
        if not_started:
            problems.append(f"part(s) {', '.join(map(str, not_started))} never started")
        if unfinished:
            problems.append(f"part(s) {', '.join(map(str, unfinished))} have not finished")
        raise ValueError(f"{out}: not every part of {count} is done: " + "; ".join(problems)
                         + ". Run (or re-run: they resume) those parts, then finalize")
    plans = {i: storage.read_json(plan_path(out, Part(i, count))) for i in range(count)}
    reference = plans[0]
    for i, plan in plans.items():
        differs = _differences(reference, plan)
        if differs:
            raise ValueError(f"{out}: parts 0 and {i} were prepared with other settings: " + "; ".join(differs))
    stats: dict[int, dict[str, Any]] = {}
    broken = []
    for key, entry in reference["files"].items():
        index = int(key)
        recorded = storage.read_json(storage.join(out, stats_name(index)))
        if recorded is None or recorded.get("input_digest") != entry["input_digest"]:
            broken.append(file_names(index))
        else:
            stats[index] = recorded
    if broken:
        raise ValueError(f"{out}: {len(broken)} planned file(s) are missing or were made from other input "
                         f"({', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''}); re-run the parts that own "
                         "them, then finalize")
    extra = extra_files({int(k) for k in reference["files"]})
    if extra:
        raise ValueError(f"{out}: {len(extra)} file(s) outside the plan ({', '.join(extra[:5])}); they would be "
                         "read as part of the dataset: remove them, or re-run a part with --overwrite")
    skipped: Counter = Counter()
    for recorded in stats.values():
        skipped.update(recorded.get("skipped", {}))
    summary = {"kind": reference["kind"], "layout": reference["layout"], "parts": count,
               "files": len(stats), "rows_in": sum(s.get("rows", 0) for s in stats.values()),
               "written": sum(s.get("successes", s.get("images", 0)) for s in stats.values()),
               "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
               "bytes": sum(s.get("bytes", 0) for s in stats.values()),
               "provenance": reference.get("provenance", {}), "options_sha256": reference["options_sha256"],
               "finalized": time.time()}
    return Finalized(out, reference, stats, summary)
