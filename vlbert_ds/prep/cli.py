"""`vlbert-prep`: build WebDataset shards (captions, text corpora, the embedded default, VQA/VCR/RefCOCO+).

Exit status: 0 when something usable was written; 1 when nothing was (every row skipped); 2 for bad
arguments or an output that cannot be written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import fsspec

from vlbert_ds.bundled import default_bert
from vlbert_ds.data import storage
from vlbert_ds.data.schema import DEFAULT_CLASS_TOPK, FEATURE_DTYPES, Compaction
from vlbert_ds.prep.parts import SUMMARY_NAME, WHOLE, Part
from vlbert_ds.prep.writer import PrepSummary, chunk, key_value_table, write_dataset


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder: a path or any fsspec URL (s3://bucket/dir)")
    parser.add_argument("--processes", type=int, default=max(1, (os.cpu_count() or 2)),
                        help="worker processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="redo shards whose stats file already exists")
    parser.add_argument("--tokenizer", default=None, help="BERT tokenizer folder (default: the bundled MiniLM)")
    parser.add_argument("--skipped-log", default=None, metavar="FILE",
                        help="write every skipped input row with its reason here, one JSON object a line")


def _part(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", default=None, metavar="I/N",
                        help="write only part I of N (0-based, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT): N "
                             "runs on N GPUs or nodes write disjoint files of one --out, each resumable on its own; "
                             "then `vlbert-prep finalize OUT`")


def part_of(args: argparse.Namespace) -> Part:
    return Part.parse(args.part) if getattr(args, "part", None) else WHOLE


def _compaction(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--feature-dtype", choices=FEATURE_DTYPES, default="int8",
                        help="how region features are stored (format 2): int8 or float8 (e4m3) codes with a "
                             "per-box scale, widened on the device, or float16 as format 1 (default: int8)")
    parser.add_argument("--class-topk", type=int, default=None, metavar="K",
                        help="keep each box's K most likely classes, renormalised (0: dense distributions; "
                             f"default: {DEFAULT_CLASS_TOPK}, >= 99%% of the mass of detector-like distributions, "
                             "when that is under half the class count, else dense)")


def compaction_of(args: argparse.Namespace) -> Compaction:
    return Compaction(feature_dtype=args.feature_dtype, class_topk=args.class_topk)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlbert-prep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    captions = sub.add_parser("captions", help="image-caption manifest or img2dataset output (+ region files) -> "
                              "vision-language shards")
    _common(captions)
    _compaction(captions)
    _part(captions)
    source = captions.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="JSONL, TSV/CSV (header) or parquet")
    source.add_argument("--img2dataset", metavar="SRC",
                        help="img2dataset output: its folder (webdataset or files layout, any fsspec URL) or a brace "
                             "pattern of its tars; every row of its parquet files is accounted for")
    captions.add_argument("--caption-field", default=None, metavar="FIELD",
                          help="with --img2dataset: take the caption from this field of KEY.json (e.g. a column kept "
                               "with --save_additional_columns) instead of KEY.txt")
    captions.add_argument("--device", default="auto",
                          help="with --detector: auto (a GPU when present), cpu, cuda:1, ...")
    captions.add_argument("--detector-min-size", type=int, default=None, metavar="PX",
                          help="with --detector: its input short side (as `regions --min-size`)")
    captions.add_argument("--detector-max-size", type=int, default=None, metavar="PX",
                          help="with --detector: its input long side at most (as `regions --max-size`)")
    captions.add_argument("--image-root", default=None, help="folder that relative image paths live in "
                          "(default: the manifest's folder)")
    captions.add_argument("--regions", default=None,
                          help="region file(s), comma-separated: bottom-up-attention or LXMERT TSV (also "
                               "generate_tsv.py's feats.tsv.0 and .tsv.gz), or a folder of frcnn JSON")
    captions.add_argument("--allow-local-urls", action="store_true",
                          help="let manifest image references be absolute paths or file:// (and other "
                               "local-filesystem) URLs; off by default so that a manifest cannot read "
                               "arbitrary files of this machine")
    captions.add_argument("--detector", default=None,
                          help="detect the regions first, as `vlbert-prep regions --detector` (bua:WEIGHTS or "
                               "torchvision:ARCH:WEIGHTS), into --regions DIR (default: OUT/regions), then read "
                               "them: images to shards in one command, resumable as both steps are")
    captions.add_argument("--no-images", action="store_true",
                          help="store region features only (precomputed mode); needs --regions or --detector")
    captions.add_argument("--short-side", type=int, default=600)
    captions.add_argument("--max-long-side", type=int, default=1000)
    captions.add_argument("--samples-per-shard", type=int, default=1000)

    text = sub.add_parser("text", help="text corpora (plain text, parquet, JSONL) -> text segments")
    _common(text)
    _part(text)
    text.add_argument("inputs", nargs="+",
                      help="paths or fsspec URLs: plain text (.txt, a paragraph per line), parquet or JSONL (.jsonl, "
                           ".json, optionally .gz/.bz2/.xz/.zst) with a document per row in --text-field")
    text.add_argument("--text-field", default="text", help="the column/field holding each document (default: text)")
    text.add_argument("--min-words", type=int, default=64, help="basic tokens per segment, at least")
    text.add_argument("--max-wordpieces", type=int, default=128)
    text.add_argument("--samples-per-shard", type=int, default=5000)

    default = sub.add_parser("default", help="the embedded default dataset (synthetic scenes + English text)")
    _common(default)
    _compaction(default)
    default.add_argument("--num-images", type=int, default=3000)
    default.add_argument("--num-val-images", type=int, default=300)
    default.add_argument("--num-text-segments", type=int, default=3000)
    default.add_argument("--image-width", type=int, default=320)
    default.add_argument("--image-height", type=int, default=240)
    default.add_argument("--samples-per-shard", type=int, default=250)
    default.add_argument("--seed", type=int, default=0)
    vqa = sub.add_parser("vqa", help="VQA v2 questions (+ annotations) and region features -> task shards")
    _common(vqa)
    _compaction(vqa)
    _part(vqa)
    vqa.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_*_questions.json")
    vqa.add_argument("--annotations", default=None, help="v2_mscoco_*_annotations.json (absent for test)")
    vqa.add_argument("--regions", required=True, help="bottom-up-attention TSV file(s) or a folder of frcnn JSON")
    vqa.add_argument("--build-vocabulary", action="store_true",
                     help="write <out>/answers.json from these annotations (the training split)")
    vqa.add_argument("--min-answer-count", type=int, default=9)
    vqa.add_argument("--max-answers", type=int, default=3129)
    vqa.add_argument("--samples-per-shard", type=int, default=2000)

    vcr = sub.add_parser("vcr", help="VCR jsonl + per-image metadata + region features -> task shards")
    _common(vcr)
    _compaction(vcr)
    _part(vcr)
    vcr.add_argument("--annotations", required=True, help="train.jsonl / val.jsonl / test.jsonl")
    vcr.add_argument("--metadata-root", required=True, help="folder that the items' metadata_fn paths live in")
    vcr.add_argument("--regions", required=True, help="features of the VCR boxes, keyed by metadata file stem")
    vcr.add_argument("--samples-per-shard", type=int, default=1000)

    refcoco = sub.add_parser("refcoco", help="RefCOCO+ refs (JSON) + COCO instances + region features -> shards")
    _common(refcoco)
    _compaction(refcoco)
    _part(refcoco)
    refcoco.add_argument("--refs", required=True, help="refs(unc) converted to JSON (we never unpickle)")
    refcoco.add_argument("--instances", required=True, help="COCO instances_train2014.json")
    refcoco.add_argument("--split", required=True, help="train, val, testA or testB")
    refcoco.add_argument("--regions", required=True, help="features of every COCO gt box, keyed by image id")
    refcoco.add_argument("--samples-per-shard", type=int, default=2000)
    regions = sub.add_parser("regions", help="detect regions in a caption manifest's images -> region TSV files "
                             "for `vlbert-prep captions --regions DIR`")
    regions_source = regions.add_mutually_exclusive_group(required=True)
    regions_source.add_argument("--manifest", help="the caption manifest (JSONL, TSV/CSV, parquet)")
    regions_source.add_argument("--img2dataset", metavar="SRC", help="img2dataset output (as for captions); the "
                                "regions are keyed by img2dataset's key")
    _part(regions)
    regions.add_argument("--image-root", default=None, help="folder of relative image paths (default: the manifest's)")
    regions.add_argument("--allow-local-urls", action="store_true", help="as for captions")
    regions.add_argument("--detector", required=True,
                         help="bua:WEIGHTS (bottom-up-attention Faster R-CNN: our .safetensors, or the MILVLG / "
                              "airsplay ports' .pth / .pkl) or torchvision:ARCH:WEIGHTS, e.g. "
                              "torchvision:fasterrcnn_resnet50_fpn_v2:frcnn.pth (local files; nothing is downloaded)")
    regions.add_argument("--out", required=True, help="output folder: a path or any fsspec URL")
    regions.add_argument("--images-per-file", type=int, default=1000)
    regions.add_argument("--batch-size", type=int, default=4, help="images per detector call")
    regions.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:1, ...")
    regions.add_argument("--min-size", type=int, default=None,
                         help="detector input short side (default: a bua file's own, 600 for the released model "
                              "and for torchvision models)")
    regions.add_argument("--max-size", type=int, default=None,
                         help="detector input long side at most (default: a bua file's own, else 1000)")
    regions.add_argument("--proposals", type=int, default=300, help="RPN proposals per image (official: 300)")
    regions.add_argument("--overwrite", action="store_true", help="redo region files made from other input")

    trainer = sub.add_parser("train-detector", help="train a detector on the embedded default's scenes (exact "
                             "boxes and classes) and measure it on the held-out scenes")
    trainer.add_argument("--data", required=True, help="a `vlbert-prep default` folder")
    trainer.add_argument("--arch", default="bua-resnet18",
                         help="bua-resnet18/34/50/101 (our bottom-up-attention detector) or a torchvision "
                              "detection model (e.g. fasterrcnn_mobilenet_v3_large_320_fpn)")
    trainer.add_argument("--out", required=True, help="the weights file to write (.safetensors for bua-*, else "
                         ".pth); the figures go beside it")
    trainer.add_argument("--steps", type=int, default=1500)
    trainer.add_argument("--batch-size", type=int, default=4)
    trainer.add_argument("--lr", type=float, default=1e-3)
    trainer.add_argument("--train-images", type=int, default=None, help="use only the first N training scenes")
    trainer.add_argument("--eval-images", type=int, default=300)
    trainer.add_argument("--seed", type=int, default=0)

    reformat = sub.add_parser("convert", help="rewrite existing shards (format 1 or 2) as format 2, e.g. with "
                              "compact features: vlbert-prep convert OLD --out NEW --to-format 2")
    _common(reformat)
    _compaction(reformat)
    _part(reformat)
    reformat.add_argument("source", help="the shards to convert: a folder, brace pattern or glob (any fsspec URL)")
    reformat.add_argument("--to-format", type=int, choices=[2], required=True, help="the format to write (2)")

    finalize = sub.add_parser("finalize", help="after every --part of a folder is done: check the parts agree and "
                              "are complete, then write sizes.json and the dataset summary (training needs them)")
    finalize.add_argument("out", help="the folder the parts wrote (--out of every part)")
    finalize.add_argument("--skipped-log", default=None, metavar="FILE",
                          help="write every skipped input row of all parts with its reason here, one JSON object "
                               "a line")

    convert = sub.add_parser("convert-detector", help="a detector weights file (.pkl of numpy arrays, .pth) -> "
                             "safetensors, names unchanged, without running any code in it")
    convert.add_argument("input", help="detectron2-style .pkl (bottom-up-attention ports) or torch .pth")
    convert.add_argument("output", help="the .safetensors file to write")
    return parser


def convert_detector(args: argparse.Namespace) -> int:
    from vlbert_ds.model.weight_files import convert_to_safetensors

    if not args.output.endswith(".safetensors"):
        print("vlbert-prep convert-detector: the output must be a .safetensors file", file=sys.stderr)
        return 2
    try:
        state = convert_to_safetensors(args.input, args.output)
    except (ValueError, FileNotFoundError) as err:
        print(f"vlbert-prep convert-detector: {err}", file=sys.stderr)
        return 2
    count = sum(t.numel() for t in state.values())
    print(f"{args.output}: {len(state)} tensors, {count:,} values from {args.input}")
    return 0


def train_detector(args: argparse.Namespace) -> int:
    from vlbert_ds.prep.train_detector import train_and_measure

    if args.steps < 1 or args.batch_size < 1 or args.eval_images < 1:
        print("vlbert-prep train-detector: --steps, --batch-size and --eval-images must be >= 1", file=sys.stderr)
        return 2
    try:
        report = train_and_measure(args.data, args.arch, args.out, args.steps, args.batch_size, args.lr,
                                   args.train_images, args.eval_images, args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"vlbert-prep train-detector: {err}", file=sys.stderr)
        return 2
    rows = [("", "recall IoU>=0.5", "class acc. (matched)", "boxes/image")]
    for name in ("trained", "untrained"):
        m = report["held_out"][name]
        rows.append((name, f"{m['recall_iou50']:.3f}", f"{m['class_accuracy_of_matched']:.3f}",
                     f"{m['boxes_per_image']:.1f}"))
    print(f"held-out scenes: {report['held_out']['trained']['images']} images, "
          f"{report['held_out']['trained']['objects']} objects; trained {report['steps']} steps in "
          f"{report['train_seconds']:.0f} s")
    for row in rows:
        print(f"{row[0]:<10} {row[1]:>16} {row[2]:>21} {row[3]:>12}")
    print(f"weights: {args.out} (use --detector {report['detector']}); figures: "
          f"{Path(args.out).with_suffix('.json')}")
    return 0


def run_task(args: argparse.Namespace) -> list[PrepSummary]:
    from vlbert_ds.prep import task_converters as converters

    if args.command == "vqa":
        rows = converters.vqa_rows(args.questions, args.annotations)
        if args.build_vocabulary:
            if not args.annotations:
                raise ValueError("--build-vocabulary needs --annotations")
            annotations = converters.read_json(args.annotations)["annotations"]
            vocabulary = converters.build_answer_vocabulary(annotations, args.min_answer_count, args.max_answers)
            if not vocabulary:
                top = converters.most_common_answer(annotations)
                raise ValueError(f"--build-vocabulary: no answer of {args.annotations} is given at least "
                                 f"--min-answer-count={args.min_answer_count} times"
                                 + (f" (the most frequent, {top[0]!r}, is given {top[1]} times)" if top else
                                    " (it has no annotations)")
                                 + "; lower --min-answer-count for a small set")
            storage.write_json_atomic(storage.join(args.out, "answers.json"), vocabulary)
            print(f"answer vocabulary: {len(vocabulary)} answers -> {storage.join(args.out, 'answers.json')}")
    elif args.command == "vcr":
        rows = converters.vcr_rows(args.annotations, args.metadata_root)
    else:
        rows = converters.refcoco_rows(args.refs, args.instances, args.split)
        if not rows:
            raise ValueError(f"no RefCOCO+ references in split {args.split!r}")
    maker = converters.TaskRowMaker(args.command, args.regions, compaction_of(args))
    return [write_dataset(args.out, list(chunk(rows, args.samples_per_shard)), maker, args.command,
                          args.processes, args.overwrite, args.skipped_log, part_of(args), regions_provenance(args))]


def regions_provenance(args: argparse.Namespace) -> dict:
    """Where the region features come from, for the summary and the parts' agreement: our detector (its
    weights' SHA-256, from the regions folder's summary) or region files made elsewhere."""
    if getattr(args, "detector", None):
        from vlbert_ds.prep.extract import detector_provenance

        return detector_provenance(args.detector, getattr(args, "detector_min_size", None),
                                   getattr(args, "detector_max_size", None), 300)
    spec = getattr(args, "regions", None)
    if not spec:
        return {}
    made_here = storage.read_json(storage.join(spec, SUMMARY_NAME)) if "," not in spec else None
    return {"regions": spec, **({"detector": made_here.get("provenance")} if made_here else {})}


def rows_and_jobs(args: argparse.Namespace, rows_per_job: int):
    """(jobs, image root, input counts) of a manifest or an img2dataset folder."""
    if getattr(args, "img2dataset", None):
        from vlbert_ds.prep.img2dataset import jobs_of, read_img2dataset, summary_inputs

        shards = read_img2dataset(args.img2dataset)
        return jobs_of(shards, rows_per_job), "", summary_inputs(shards)
    from vlbert_ds.prep.captions import read_manifest

    rows = read_manifest(args.manifest)
    root = args.image_root if args.image_root is not None else args.manifest.rsplit("/", 1)[0] \
        if "/" in args.manifest else "."
    return list(chunk(rows, rows_per_job)), root, {"manifest rows": len(rows)}


def run_regions(args: argparse.Namespace):
    from vlbert_ds.prep.extract import extract_regions

    for name in ("images_per_file", "batch_size", "min_size", "max_size", "proposals"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    jobs, root, _ = rows_and_jobs(args, args.images_per_file)
    return extract_regions(jobs, args.out, args.detector, root, args.allow_local_urls, args.batch_size,
                           args.device, args.min_size, args.max_size, args.proposals, args.overwrite, part_of(args))


def run_finalize(args: argparse.Namespace) -> str:
    """Finalize a folder of parts (and the regions folder a `captions --detector` run made inside it)."""
    from vlbert_ds.prep.extract import finalize_regions
    from vlbert_ds.prep.writer import finalize_shards

    markers = storage.part_markers(args.out)
    if not markers["plan"]:
        raise ValueError(f"{args.out}: nothing to finalize: no {storage.PARTS_DIR}/ plans (is it the --out of "
                         "a vlbert-prep run?)")
    index, count = next(iter(sorted(markers["plan"].items())))
    plan = storage.read_json(storage.join(storage.join(args.out, storage.PARTS_DIR), f"plan-{index}-of-{count}.json"))
    if plan.get("layout") == "regions":
        summary = finalize_regions(args.out)
    else:
        inner = storage.join(args.out, "regions")
        if storage.part_markers(inner)["plan"]:
            finalize_regions(inner)
        summary = finalize_shards(args.out, args.skipped_log)
    rows = [("output", args.out), ("kind", summary["kind"]), ("parts", str(summary["parts"])),
            ("files", f"{summary['files']:,}"),
            *[(f"input {k}", f"{v:,}") for k, v in summary.get("inputs", {}).items()],
            ("rows in", f"{summary['rows_in']:,}"), ("written", f"{summary['written']:,}"),
            ("skipped", f"{summary['skipped_total']:,}"),
            *[(f"  {reason}", f"{n:,}") for reason, n in summary["skipped"].items()],
            ("bytes", f"{summary['bytes'] / 1e6:,.1f} MB"),
            *[(f"detector {k}", str(v)) for k, v in (summary.get("provenance") or {}).items() if v is not None],
            ("summary", storage.join(args.out, SUMMARY_NAME))]
    return key_value_table(rows)


def run(args: argparse.Namespace) -> list[PrepSummary]:
    if args.command == "regions":
        return [run_regions(args)]
    if args.command in ("vqa", "vcr", "refcoco"):
        return run_task(args)
    if args.command == "convert":
        from vlbert_ds.prep.convert import convert_dataset

        return [convert_dataset(args.source, args.out, compaction_of(args), args.processes, args.overwrite,
                                args.skipped_log, part_of(args))]
    tokenizer = args.tokenizer or default_bert()
    if args.command == "captions":
        from vlbert_ds.prep.captions import CaptionSampleMaker

        if args.no_images and not (args.regions or args.detector):
            raise SystemExit("vlbert-prep captions: --no-images needs --regions or --detector (features come "
                             "from them)")
        for name in ("detector_min_size", "detector_max_size"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if args.caption_field and not args.img2dataset:
            raise ValueError("--caption-field reads img2dataset's KEY.json: it needs --img2dataset")
        jobs, root, inputs = rows_and_jobs(args, args.samples_per_shard)
        regions = args.regions
        if args.detector:
            from vlbert_ds.prep.extract import extract_regions

            regions = args.regions or storage.join(args.out, "regions")
            found = extract_regions(jobs, regions, args.detector, root, args.allow_local_urls, device=args.device,
                                    min_size=args.detector_min_size, max_size=args.detector_max_size,
                                    overwrite=args.overwrite, part=part_of(args))
            print(found.table(), flush=True)
        maker = CaptionSampleMaker(root, regions, tokenizer, with_images=not args.no_images,
                                   short_side=args.short_side, max_long_side=args.max_long_side,
                                   allow_local_urls=args.allow_local_urls, compaction=compaction_of(args),
                                   caption_field=args.caption_field, regions_by_shard=bool(args.detector))
        return [write_dataset(args.out, jobs, maker, "vl", args.processes, args.overwrite, args.skipped_log,
                              part_of(args), regions_provenance(args), inputs)]
    if args.command == "text":
        from vlbert_ds.prep.text import TextJobs, TextSegmentMaker

        jobs = TextJobs(args.inputs, args.text_field, args.min_words, args.max_wordpieces, args.samples_per_shard)
        maker = TextSegmentMaker(tokenizer, args.min_words, args.max_wordpieces)
        return [write_dataset(args.out, jobs, maker, "text", args.processes, args.overwrite, args.skipped_log,
                              part_of(args))]
    from vlbert_ds.prep.default import prepare_default

    return prepare_default(args.out, tokenizer, args.num_images, args.num_val_images, args.num_text_segments,
                           args.image_width, args.image_height, args.samples_per_shard, args.seed, args.processes,
                           args.overwrite, compaction_of(args))


# Each command's input arguments: (attribute, flag, what it must be).
_INPUTS = {
    "captions": [("manifest", "--manifest", "file"), ("image_root", "--image-root", "folder"),
                 ("regions", "--regions", "any")],
    "text": [("inputs", "inputs", "file")],
    "vqa": [("questions", "--questions", "file"), ("annotations", "--annotations", "file"),
            ("regions", "--regions", "any")],
    "vcr": [("annotations", "--annotations", "file"), ("metadata_root", "--metadata-root", "folder"),
            ("regions", "--regions", "any")],
    "refcoco": [("refs", "--refs", "file"), ("instances", "--instances", "file"), ("regions", "--regions", "any")],
    "regions": [("manifest", "--manifest", "file"), ("image_root", "--image-root", "folder")],
    "finalize": [("out", "OUT", "folder")],
    "convert": [("source", "source", "any")],
}


def check_inputs(args: argparse.Namespace) -> None:
    """Every input named on the command line exists, before the output folder is touched."""
    part_of(args)  # a malformed or out-of-range --part
    if args.command == "text":
        from vlbert_ds.prep.text import expand_inputs

        args.inputs = expand_inputs(args.inputs)
    if getattr(args, "img2dataset", None):
        from vlbert_ds.prep.img2dataset import find_shards

        find_shards(args.img2dataset)
    for attribute, flag, kind in _INPUTS.get(args.command, []):
        value = getattr(args, attribute, None)
        if not value or (attribute == "regions" and getattr(args, "detector", None)):
            continue  # (with --detector, --regions is where the detected regions go)
        urls = value if isinstance(value, list) else [p for p in value.split(",") if p] \
            if attribute == "regions" else [value]
        for url in urls:
            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(path):
                raise ValueError(f"{flag} {url}: no such {'file' if kind == 'file' else 'file or folder'}")
            if kind == "file" and fs.isdir(path):
                raise ValueError(f"{flag} {url}: is a folder, expected a file")
            if kind == "folder" and not fs.isdir(path):
                raise ValueError(f"{flag} {url}: is not a folder")
    if args.command == "regions" or getattr(args, "detector", None):
        from vlbert_ds.model.detector import parse_detector_spec

        _, _, weights = parse_detector_spec(args.detector)
        if weights and not fsspec.core.url_to_fs(weights)[0].exists(weights):
            raise ValueError(f"--detector {args.detector}: weights file {weights} not found")
    elif getattr(args, "regions", None):
        from vlbert_ds.prep.regions import check_regions

        for folder in (p for p in args.regions.split(",") if p):
            reason = storage.unfinalized_reason(folder, SUMMARY_NAME)
            if reason:
                raise ValueError(f"--regions {reason}")
        print(f"regions: {check_regions(args.regions)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "convert-detector":
        return convert_detector(args)
    if args.command == "train-detector":
        return train_detector(args)
    prog = f"vlbert-prep {args.command}"
    try:
        check_inputs(args)
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if args.command == "finalize":
        try:
            print(run_finalize(args))
        except (ValueError, OSError) as err:
            print(f"{prog}: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        storage.makedirs(args.out)
    except OSError as err:
        print(f"{prog}: cannot create the output folder {args.out}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    try:
        summaries = run(args)
    except FileNotFoundError as err:
        print(f"{prog}: {err.filename or ''}{': ' if err.filename else ''}{err.strerror or err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permission denied, ... (reading inputs or writing shards)
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"{prog}: {type(err).__name__}{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    for summary in summaries:
        print(summary.table())
    part = part_of(args)
    if part.count > 1:
        print(f"{prog}: part {part} done; run `vlbert-prep finalize {args.out}` when all {part.count} parts are done",
              flush=True)
        if all(s.files_total == 0 if args.command == "regions" else s.shards_total == 0 for s in summaries):
            print(f"{prog}: part {part} owns no output file (the input makes fewer files than parts)")
            return 0
    if args.command == "regions":
        return 0 if summaries[0].images or summaries[0].files_already_done else 1
    if any(s.samples == 0 for s in summaries):
        print(f"{prog}: nothing usable was produced for "
              + ", ".join(s.out for s in summaries if s.samples == 0)
              + (f" (every skipped row is listed in {args.skipped_log})" if args.skipped_log
                 else " (rerun with --skipped-log FILE to list every skipped row and why)"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
