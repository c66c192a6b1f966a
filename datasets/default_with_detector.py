"""The embedded default's scenes with regions from a detector instead of the generator's boxes.

The proof that region extraction works end to end (docs/regions.md): the default scenes become
what a user brings (JPEG files and a caption manifest), a detector finds their regions
(`vlbert-prep regions`), `vlbert-prep captions --regions` writes the shards, and pretraining on them
is judged by the same grounding check as the main job (`grounding.data`).

    .venv/bin/python datasets/default_with_detector.py --default data/default \\
        --detector bua:runs/detector/bua_r18.safetensors --out data/default-detected --train-images 1000

Each step is one of our commands and resumable as they are; a re-run skips what is done.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from vlbert_ds.data import storage


def export_scenes(shards: str, out: Path, limit: int | None) -> tuple[Path, int]:
    """Shards of `vlbert-prep default` -> `out/images/KEY.jpg` and `out/manifest.jsonl`."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for url in storage.expand_urls(shards):
        with storage.open_with_retries(url) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            sample: dict[str, bytes] = {}
            for member in tar:
                key, _, suffix = member.name.partition(".")
                sample[suffix] = tar.extractfile(member).read()
                if {"jpg", "json"} <= set(sample):
                    meta = json.loads(sample["json"])
                    image = out / "images" / f"{key}.jpg"
                    if not image.exists():
                        image.write_bytes(sample["jpg"])
                    rows.append({"image": f"images/{key}.jpg", "caption": meta["caption"], "image_id": key})
                    sample = {}
                if limit is not None and len(rows) >= limit:
                    break
        if limit is not None and len(rows) >= limit:
            break
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, len(rows)


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--default", required=True, help="a `vlbert-prep default` folder")
    parser.add_argument("--detector", required=True, help="as `vlbert-prep regions --detector`")
    parser.add_argument("--out", required=True, help="output folder (vl/train, vl/val, work/)")
    parser.add_argument("--train-images", type=int, default=None, help="only the first N training scenes")
    parser.add_argument("--val-images", type=int, default=None, help="only the first N held-out scenes")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--proposals", type=int, default=300, help="RPN proposals per image (official: 300)")
    args = parser.parse_args(argv)
    prep = str(Path(sys.executable).with_name("vlbert-prep"))
    out = Path(args.out)
    for split, limit in (("train", args.train_images), ("val", args.val_images)):
        work = out / "work" / split
        manifest, count = export_scenes(storage.join(args.default, f"vl/{split}"), work, limit)
        print(f"{split}: {count} scenes -> {manifest}", flush=True)
        run([prep, "regions", "--manifest", str(manifest), "--detector", args.detector,
             "--out", str(work / "regions"), "--batch-size", str(args.batch_size),
             "--proposals", str(args.proposals)])
        run([prep, "captions", "--manifest", str(manifest), "--regions", str(work / "regions"),
             "--out", str(out / "vl" / split)])
    print(f"\npretrain on it (the main job's recipe, these shards, the grounding check on vl/val):\n"
          f"  bash launch/local.sh 2 configs/default.yaml data.prepare_default= "
          f"'data.vl_sources=[{out}/vl/train]' 'data.text_sources=[{args.default}/text/train]' "
          f"grounding.data={out}/vl/val "
          f"'model.overrides={{visual_ln_gain_init: 0.05, precomputed_feature_dim: FEATURE_DIM}}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
