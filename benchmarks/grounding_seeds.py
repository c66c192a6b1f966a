"""The learning test's run (tests/test_short_pretraining.py) for several seeds: its grounding margin per seed.

The test asserts that grounding with the image beats the image withheld by a margin; this script is where
the margin's evidence comes from. Each seed is one run of exactly the test's spec (its RANKS, batch and
steps), one after the other (so the seconds are those of an otherwise idle machine; two invocations with
different --seeds can share a 2-core machine, one core each, and their JSON rows merge). Prints a table,
writes JSON.

    .venv/bin/python benchmarks/grounding_seeds.py --seeds 12345 1 2 3 4 --json benchmarks/results/grounding_seeds.json
    .venv/bin/python benchmarks/grounding_seeds.py data.vl_per_batch=16 --every 50 --seeds 2   # another shape

Overrides go before `--seeds` (which takes every number after it).
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ranks import run_ranks  # noqa: E402
from test_short_pretraining import RANKS, STEPS, TEXT_PER_RANK, VL_PER_RANK, short_pretraining_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[12345, 1, 2, 3, 4])
    parser.add_argument("--json", default="")
    parser.add_argument("--every", type=int, default=0,
                        help="also evaluate grounding every N steps (the margin's course; the last row is the test's)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides after the test's own (another shape than the test's, e.g. "
                             "data.vl_per_batch=16 train.steps=200); recorded in the JSON")
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so run_ranks' cleanup kills the seed's worker instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    extra = [*args.overrides, *([f"grounding.every={args.every}"] if args.every else [])]
    chosen = dict(o.split("=", 1) for o in extra)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"grounding-seed{seed}-") as folder:
            start = time.monotonic()
            report, _ = run_ranks(short_pretraining_spec(Path(folder), seed, extra), RANKS, Path(folder))
            final = report["final"]
            rows.append({"seed": seed, "seconds": round(time.monotonic() - start, 1),
                         "with_image": final["grounded_mlm_acc_with_image"],
                         "image_withheld": final["grounded_mlm_acc_image_withheld"],
                         "margin": final["grounded_mlm_acc_with_image"] - final["grounded_mlm_acc_image_withheld"],
                         "final_loss": report["step_losses"][str(max(map(int, report["step_losses"])))]})
            row = rows[-1]
            if args.every:
                metrics = Path(folder) / "run" / "metrics.jsonl"
                course = [json.loads(line) for line in metrics.read_text().splitlines()]
                row["margin_by_step"] = {r["step"]: round(r["grounded_mlm_acc_with_image"]
                                                          - r["grounded_mlm_acc_image_withheld"], 4)
                                         for r in course if "grounded_mlm_acc_with_image" in r and "step" in r}
                print("  margin by step: " + "  ".join(f"{k}: {v:+.3f}" for k, v in row["margin_by_step"].items()))
            print(f"seed {seed:>6}: with image {row['with_image']:.3f}  withheld {row['image_withheld']:.3f}  "
                  f"margin {row['margin']:+.3f}  ({row['seconds']:.0f} s)", flush=True)
    margins = [r["margin"] for r in rows]
    print(f"margins: min {min(margins):+.3f}  mean {sum(margins) / len(margins):+.3f}  max {max(margins):+.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "run": {"steps": int(chosen.get("train.steps", STEPS)), "ranks": RANKS,
                    "vl_per_rank": int(chosen.get("data.vl_per_batch", VL_PER_RANK)),
                    "text_per_rank": int(chosen.get("data.text_per_batch", TEXT_PER_RANK)), "precision": "fp32",
                    "overrides": extra},
            "seeds": rows, "machine": {"platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
