"""Preparation in parts (`--part I/N`, `vlbert-prep finalize`) and text corpora as parquet / JSONL tables.

The parts' output is compared byte for byte with a one-part run of the same input; the text tables with the
same paragraphs given as a plain-text file; the memory bound with the peak RSS of the real command.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlbert_ds.data import storage
from vlbert_ds.prep.cli import main as prep_main

PREP = [sys.executable, "-m", "vlbert_ds.prep.cli"]


def _english_paragraphs(count: int, seed: int = 0) -> list[str]:
    """Real English: paragraphs of Python's own documentation (pydoc_data), shuffled by `seed`."""
    from pydoc_data.topics import topics

    paragraphs = [" ".join(p.split()) for text in topics.values() for p in text.split("\n\n") if len(p.split()) > 3]
    random.Random(seed).shuffle(paragraphs)
    return paragraphs[:count]


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    """The dataset files a reader sees (shards, sizes.json), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))} | \
        {"sizes.json": (folder / "sizes.json").read_bytes()}


def test_plain_text_parquet_and_jsonl_give_the_same_segments_and_count_bad_rows(tmp_path):
    paragraphs = _english_paragraphs(240)
    documents = [paragraphs[i : i + 4] for i in range(0, len(paragraphs), 4)]  # 4 paragraphs a document
    (tmp_path / "corpus.txt").write_text("".join(p + "\n" for p in paragraphs))
    pq.write_table(pa.table({"id": list(range(len(documents))), "body": ["\n".join(d) for d in documents]}),
                   tmp_path / "corpus.parquet", row_group_size=7)
    bad = [json.dumps({"text": None}), json.dumps({"text": "   "}), json.dumps({"text": 3}), "{broken",
           json.dumps(["a list"]), json.dumps({"other": "field"})]
    lines = [json.dumps({"text": "\n\n".join(d)}) for d in documents]
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt") as handle:
        handle.write("\n".join(lines[:10] + bad + lines[10:]) + "\n")
    common = ["--samples-per-shard", "64", "--processes", "1"]
    assert prep_main(["text", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "txt"), *common]) == 0
    assert prep_main(["text", str(tmp_path / "corpus.parquet"), "--text-field", "body", "--out",
                      str(tmp_path / "parquet"), *common]) == 0
    assert prep_main(["text", str(tmp_path / "corpus.jsonl.gz"), "--out", str(tmp_path / "jsonl"), *common]) == 0
    reference = _folder_bytes(tmp_path / "txt")
    assert len(reference) == 5  # 240 segments in shards of 64, and sizes.json
    assert _folder_bytes(tmp_path / "parquet") == reference
    assert _folder_bytes(tmp_path / "jsonl") == reference
    summary = json.loads((tmp_path / "jsonl" / "prep-summary.json").read_text())
    assert summary["inputs"] == {"documents": 66, "empty_text": 1, "malformed_row": 2, "missing_text_field": 1,
                                 "non_string_text": 2}
    assert summary["rows_in"] == summary["written"] == 240
    # A table without the named column is refused, naming the columns it has, and nothing is written.
    assert prep_main(["text", str(tmp_path / "corpus.parquet"), "--out", str(tmp_path / "none"), *common]) == 2
    assert not list((tmp_path / "none").glob("shard-*"))


def _text_parts(tmp_path: Path, corpus: Path, parts: int, out: Path, *extra: str) -> list[subprocess.Popen]:
    return [subprocess.Popen([*PREP, "text", str(corpus), "--out", str(out), "--samples-per-shard", "16",
                              "--processes", "1", "--part", f"{i}/{parts}", *extra], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(parts)]


def test_parts_run_in_parallel_then_finalized_equal_one_part_and_bad_use_is_refused(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(p + "\n" for p in _english_paragraphs(150, seed=1)))
    whole = tmp_path / "whole"
    assert prep_main(["text", str(corpus), "--out", str(whole), "--samples-per-shard", "16", "--processes", "1"]) == 0
    parted = tmp_path / "parted"
    runs = _text_parts(tmp_path, corpus, 3, parted)
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
    assert "run `vlbert-prep finalize" in output
    # 10 shards over 3 parts: 0,3,6,9 / 1,4,7 / 2,5,8, each part only its own.
    done = [json.loads((parted / "_parts" / f"done-{i}-of-3.json").read_text())["files"] for i in range(3)]
    assert done == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    # Not finalized: training refuses the folder and names what to do.
    with pytest.raises(ValueError, match="not finalized: all 3 parts are done; run `vlbert-prep finalize"):
        storage.read_sizes(storage.expand_urls(str(parted)))
    capsys.readouterr()
    assert prep_main(["finalize", str(parted)]) == 0
    printed = [line.split("|") for line in capsys.readouterr().out.splitlines() if "|" in line]
    assert {k.strip(): v.strip() for k, v in printed}["written"] == "150"
    assert _folder_bytes(parted) == _folder_bytes(whole)
    assert json.loads((parted / "prep-summary.json").read_text())["written"] == 150

    # Bad use, each refused with a message, writing nothing.
    before = sorted(p.name for p in parted.rglob("*"))
    for bad, message in ((["--part", "3/3"], "must be in 0..2"), (["--part", "one/3"], "expected I/N"),
                         (["--part", "1/0"], "must be >= 1")):
        assert prep_main(["text", str(corpus), "--out", str(parted), "--samples-per-shard", "16", *bad]) == 2
        assert message in capsys.readouterr().err
    assert prep_main(["text", str(corpus), "--out", str(parted), "--samples-per-shard", "8", "--part", "1/3"]) == 2
    assert "part 0/3 was prepared with other settings" in capsys.readouterr().err
    assert prep_main(["text", str(corpus), "--out", str(parted), "--samples-per-shard", "16", "--part", "1/2"]) == 2
    assert "the number of parts" in capsys.readouterr().err
    assert sorted(p.name for p in parted.rglob("*")) == before
    assert prep_main(["finalize", str(tmp_path)]) == 2
    assert "nothing to finalize" in capsys.readouterr().err


def test_finalize_before_every_part_is_done_names_the_missing_parts(tmp_path, capsys, default_data):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(p + "\n" for p in _english_paragraphs(80, seed=2)))
    out = tmp_path / "out"
    assert prep_main(["text", str(corpus), "--out", str(out), "--samples-per-shard", "16", "--part", "1/4"]) == 0
    capsys.readouterr()
    assert prep_main(["finalize", str(out)]) == 2
    assert "part(s) 0, 2, 3 never started" in capsys.readouterr().err
    assert not (out / "sizes.json").exists() and not (out / "prep-summary.json").exists()
    # The trainer's loader refuses it too, before any step: the pretraining command exits 2 naming the parts.
    result = subprocess.run([sys.executable, "-m", "vlbert_ds.cli.pretrain", "model.bert=", "model.preset=tiny",
                             f"data.vl_sources=[{default_data}/vl/train]", f"data.text_sources=[{out}]",
                             "data.samples_per_epoch=8", f"train.output_dir={tmp_path / 'run'}",
                             "tracking.enabled=false"], capture_output=True, text=True, timeout=600,
                            env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "HOME": "/tmp"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "part(s) 0, 2, 3 of 4 have not finished" in result.stderr
    assert "step 1" not in result.stdout


def _peak_rss_mib(command: list[str]) -> tuple[int, float, str]:
    """Run `command`; its exit code and the largest resident set of it or any process it waited for."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
             "sys.stderr.write(r.stdout[-2000:] + r.stderr[-2000:])")
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, timeout=1200)
    code, peak = result.stdout.split()
    return int(code), float(peak), result.stderr


@pytest.mark.slow
def test_a_text_parquet_larger_than_the_memory_bound_is_prepared_under_it(tmp_path):
    """The bound: 250 MiB of peak RSS above what the same command takes for a 1 MB corpus (torch and the
    tokenizer alone are ~700 MiB here). The corpus: 600 MB of text in a 300 MB parquet, every row different,
    every paragraph at the 1,024-word cap, the worst case for a shard job's memory. And the peak does not
    grow with the file: a third of it peaks as high (measured: +188 MiB for 600 MB, +210 for 200 MB)."""
    bound_mib = 250
    paragraphs = _english_paragraphs(4000, seed=3)
    rng = random.Random(0)

    def corpus(path: Path, megabytes: float) -> int:
        writer, written = None, 0
        while written < megabytes * 2**20:
            # Long documents as Wikipedia has them: 8 paragraphs of ~10 KB (cut to 1,024 words when read).
            documents = ["\n".join(" ".join(rng.sample(paragraphs, 60)) for _ in range(8)) for _ in range(64)]
            table = pa.table({"text": documents})
            writer = writer or pq.ParquetWriter(path, table.schema, compression="snappy", use_dictionary=False)
            writer.write_table(table)
            written += sum(len(d.encode()) for d in documents)
        writer.close()
        return written

    paths = {"small": tmp_path / "small.parquet", "third": tmp_path / "third.parquet", "big": tmp_path / "big.parquet"}
    corpus(paths["small"], 1)
    corpus(paths["third"], 200)
    text_bytes = corpus(paths["big"], 600)
    assert text_bytes > 2 * bound_mib * 2**20 and paths["big"].stat().st_size > bound_mib * 2**20
    peaks = {}
    for name, path in paths.items():
        code, peaks[name], output = _peak_rss_mib([*PREP, "text", str(path), "--out", str(tmp_path / name),
                                                   "--processes", "2"])
        assert code == 0, output
    sizes = json.loads((tmp_path / "big" / "sizes.json").read_text())
    assert sum(sizes.values()) > 50_000  # a segment per paragraph
    assert peaks["big"] - peaks["small"] < bound_mib, peaks
    assert peaks["big"] - peaks["third"] < 50, peaks  # three times the text, no more memory


def test_segments_equal_tokenising_whole_lines_then_truncating(tokenizer, minilm_folder):
    """The maker tokenises only each line's first words; the ids must be those of the plain definition:
    tokenise every basic token of the lines up to 64, keep the first 128 ids. Lines with characters BERT's
    normaliser deletes, whitespace Python and BERT disagree on, accents, CJK."""
    import io

    import numpy as np

    from vlbert_ds.prep.text import TextSegmentMaker

    maker = TextSegmentMaker(str(minilm_folder), 64, 128)
    backend = tokenizer.backend_tokenizer
    odd = ["\x1c", "\u200b", "\x0b", "\u00a0", "中文字", "café", "e\u0301", "\u3000", "\x00", "\t", "...", "\x85"]
    paragraphs = _english_paragraphs(300, seed=4)
    rng = random.Random(0)
    for _ in range(150):
        window = []
        for _ in range(rng.randint(1, 3)):
            words = rng.choice(paragraphs).split() * rng.randint(1, 6)
            for _ in range(rng.randint(0, 30)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(odd))
            window.append(rng.choice([" ", "\x1c", " \u00a0", "\x0b "]).join(words))
        words = []
        for line in window:
            words += [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line))]
            if len(words) >= 64:
                break
        expected = tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"][:128]
        (sample,) = maker(window, 0, 0)
        assert np.load(io.BytesIO(sample["tokens.npy"])).tolist() == expected, window
