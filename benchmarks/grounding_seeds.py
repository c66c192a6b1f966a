"""The learning test's run (tests/test_short_pretraining.py) for several seeds: its grounding margin per seed.

The test asserts that grounding with the image beats the image withheld by a margin; this script is where
the margin's evidence comes from. Each seed is one run of exactly the test's spec (its RANKS, batch and
steps), one after the other (so the seconds are those of an otherwise idle machine; two invocations with
different --seeds can share a 2-core machine, one core each, and their JSON rows merge). Prints a table,
writes JSON.

    .venv/bin/python benchmarks/grounding_seeds.py --seeds 12345 1 2 3 4 --json benchmarks/results/grounding_seeds.json
"""

from __future__ import annotations

import argparse
import json
import platform
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
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"grounding-seed{seed}-") as folder:
            start = time.monotonic()
            report, _ = run_ranks(short_pretraining_spec(Path(folder), seed), RANKS, Path(folder))
            final = report["final"]
            rows.append({"seed": seed, "seconds": round(time.monotonic() - start, 1),
                         "with_image": final["grounded_mlm_acc_with_image"],
                         "image_withheld": final["grounded_mlm_acc_image_withheld"],
                         "margin": final["grounded_mlm_acc_with_image"] - final["grounded_mlm_acc_image_withheld"],
                         "final_loss": report["step_losses"][str(STEPS)]})
            row = rows[-1]
            print(f"seed {seed:>6}: with image {row['with_image']:.3f}  withheld {row['image_withheld']:.3f}  "
                  f"margin {row['margin']:+.3f}  ({row['seconds']:.0f} s)", flush=True)
    margins = [r["margin"] for r in rows]
    print(f"margins: min {min(margins):+.3f}  mean {sum(margins) / len(margins):+.3f}  max {max(margins):+.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "run": {"steps": STEPS, "ranks": RANKS, "vl_per_rank": VL_PER_RANK, "text_per_rank": TEXT_PER_RANK,
                    "precision": "fp32"},
            "seeds": rows, "machine": {"platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
