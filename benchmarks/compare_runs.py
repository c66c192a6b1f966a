"""Compare the losses of finished runs step by step (the main job on shards of other formats, seeds).

    python benchmarks/compare_runs.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--json OUT]

Prints, per run, the mean of each loss over steps 1-100, 101-200 and 201-300 (of `metrics.jsonl`),
and, against the first run, the mean absolute per-step difference of the total loss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LOSSES = ("loss", "mlm_vl", "mlm_text", "mrc")


def read(run: str) -> dict[int, dict]:
    rows = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = {spec.split("=", 1)[0]: read(spec.split("=", 1)[1]) for spec in args.runs}
    first = next(iter(runs.values()))
    windows = [(1, 100), (101, 200), (201, 300)]
    out = {}
    print(f"{'run':<14} {'loss part':<9} " + " ".join(f"{f'{a}-{b}':>9}" for a, b in windows)
          + f" {'|d loss| vs ' + next(iter(runs)):>22}")
    for name, rows in runs.items():
        out[name] = {}
        for part in LOSSES:
            means = [sum(rows[s][part] for s in range(a, b + 1) if s in rows) /
                     max(1, sum(1 for s in range(a, b + 1) if s in rows)) for a, b in windows]
            out[name][part] = means
            diff = ""
            if part == "loss":
                common = [s for s in rows if s in first]
                out[name]["mean_abs_step_difference"] = sum(abs(rows[s]["loss"] - first[s]["loss"])
                                                            for s in common) / len(common)
                diff = f"{out[name]['mean_abs_step_difference']:.3f}"
            print(f"{name:<14} {part:<9} " + " ".join(f"{m:>9.3f}" for m in means) + f" {diff:>22}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
