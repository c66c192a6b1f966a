"""Resume cost and shuffle quality of the shard loader (issue 16).

Start-to-first-batch time of a loader resumed at 10% and at 90% of an exact epoch of >= 100,000
vision-language samples (the default scenes' shards linked many times over), for this tree and, with
--before PATH, for another checkout of vlbert_ds (run in a subprocess with that tree on sys.path).
Shuffle quality: Spearman correlation (3,200 samples) between a sample's position in its shard and its position in the
epoch's batch stream (0 = no trace of the shard order). Prints a table and writes JSON.

    .venv/bin/python benchmarks/elastic_resume.py --data data/default --before /path/to/old/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROBE = r'''
import json, sys, time
from vlbert_ds.data import ExampleConfig, LoaderConfig, PretrainStream, ResumableLoader, SourceSpec
spec = json.loads(sys.argv[1])
config = LoaderConfig(vl_sources=[SourceSpec(spec["vl"])], text_sources=[SourceSpec(spec["text"])],
                      tokenizer=spec["tokenizer"], mode="exact", vl_per_batch=16, text_per_batch=16, num_workers=0,
                      shuffle_buffer=500, example=ExampleConfig(num_region_classes=25))
out = {}
for fraction in spec["fractions"]:
    start = time.perf_counter()
    stream = PretrainStream(config, check_sources=False)
    total = len(stream)
    position = int(total * fraction)
    if hasattr(stream, "merge_states"):  # this tree: the global position an uninterrupted run would have saved
        from vlbert_ds.data.elastic import reader_batches_before
        loader = ResumableLoader(stream)
        state = stream.state_dict()
        counts = [sum(p.count for p in pieces) for pieces in stream.plan]
        taken = {str(r): [min(counts[r], 16 * reader_batches_before(r, position, stream.layout)),
                          16 * reader_batches_before(r, position, stream.layout)] for r in range(stream.layout.readers)}
        state.update(micro_batches=position, readers=taken)  # no sample of the default data is rejected
        loader.load_state_dict(state)
    else:  # before: (epoch, consumed batches)
        loader = ResumableLoader(stream)
        loader.load_state_dict({"epoch": 0, "consumed": position, "world_size": 1})
    next(loader)
    out[str(fraction)] = {"seconds": time.perf_counter() - start, "position": position, "batches": total}
    loader.close()
import numpy as np
config = LoaderConfig(vl_sources=[SourceSpec(spec["default_vl"])], text_sources=[SourceSpec(spec["text"])],
                      tokenizer=spec["tokenizer"], mode="exact", vl_per_batch=16, text_per_batch=16, num_workers=0,
                      shuffle_buffer=spec["shuffle_buffer"], example=ExampleConfig(num_region_classes=25))
order = [(k, s) for b in PretrainStream(config, check_sources=False) for k, s in zip(b.keys, b.shards)]
index, seen = {}, {}
for key, shard in sorted(order, key=lambda ks: (ks[1], ks[0])):  # keys are written in shard order
    index[(key, shard)] = seen.setdefault(shard, 0)
    seen[shard] += 1
x = np.argsort(np.argsort([index[o] for o in order]))
rho = float(np.corrcoef(x, np.arange(len(order)))[0, 1])
out["shuffle"] = {"samples": len(order), "spearman_in_shard_vs_stream": rho}
print("RESULT " + json.dumps(out))
'''


def link_epoch(data: Path, out: Path, copies: int) -> None:
    """`copies` x the default train shards as links, with a sizes.json for them all."""
    src = data / "vl/train"
    sizes = json.loads((src / "sizes.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    table = {}
    for copy in range(copies):
        for name, count in sizes.items():
            link = out / f"c{copy:05d}-{name}"
            if not link.exists():
                os.symlink(src / name, link)
            table[link.name] = count
    (out / "sizes.json").write_text(json.dumps(table))


def resume_times(tree: Path | None, spec: dict) -> dict:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    run = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], env=env, capture_output=True, text=True,
                         timeout=3600, cwd=str(tree) if tree else None)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/default")
    parser.add_argument("--work", default="runs/bench_elastic")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--before", default="", help="another vlbert_ds checkout to compare with")
    parser.add_argument("--out", default="benchmarks/results/elastic_resume.json")
    args = parser.parse_args()
    from vlbert_ds.bundled import default_bert

    data = Path(args.data)
    per_copy = sum(json.loads((data / "vl/train/sizes.json").read_text()).values())
    copies = -(-args.samples // per_copy)
    epoch = Path(args.work) / "vl"
    link_epoch(data, epoch, copies)
    mixed = Path(args.work) / "vl_shuffle"  # 20 copies: 3,200 samples, enough to see a correlation of 0.05
    link_epoch(data, mixed, 20)
    spec = {"vl": str(epoch.resolve()), "text": str((data / "text/train").resolve()), "tokenizer": default_bert(),
            "fractions": [0.1, 0.9], "default_vl": str(mixed.resolve()), "shuffle_buffer": 100}
    results = {"samples": copies * per_copy, "this": resume_times(None, spec)}
    if args.before:
        results["before"] = resume_times(Path(args.before), spec)
    print(f"exact epoch of {results['samples']} samples (16 per micro-batch), start to first batch:")
    print(f"{'position':>10} {'this (s)':>10} {'before (s)':>11} {'before/this':>12}")
    for fraction in ("0.1", "0.9"):
        this = results["this"][fraction]["seconds"]
        before = results.get("before", {}).get(fraction, {}).get("seconds")
        ratio = f"{before / this:12.1f}" if before else f"{'-':>12}"
        print(f"{float(fraction):>10.0%} {this:>10.2f} {before if before else float('nan'):>11.2f} {ratio}")
    for name in ("this", "before"):
        if name in results:
            rho = results[name]["shuffle"]["spearman_in_shard_vs_stream"]
            print(f"shuffle ({name}): Spearman(in-shard index, stream position) = {rho:.3f} (buffer 100)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
