"""The streaming loader on local shards: exact epochs, equal batches, resume, corrupt data, model-ready batches."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from vlbert_ds.data import ExampleConfig, LoaderConfig, PretrainStream, ResumableLoader, SourceSpec, build_loader
from vlbert_ds.data.pipeline import plan_exact_epoch
from vlbert_ds.data.streams import worker_loader
from vlbert_ds.model import VLBertConfig, VLBertForPretraining


def _config(data, minilm_folder, **overrides) -> LoaderConfig:
    base = dict(vl_sources=[SourceSpec(str(data / "vl/train"))], text_sources=[SourceSpec(str(data / "text/train"))],
                tokenizer=str(minilm_folder), mode="exact", vl_per_batch=8, text_per_batch=8, num_workers=2,
                shuffle_buffer=16, example=ExampleConfig(num_region_classes=25))
    base.update(overrides)
    return LoaderConfig(**base)


def _epoch(config, rank=0, world=1, epoch=0, workers=True):
    stream = PretrainStream(config, rank, world)
    stream.set_epoch(epoch)
    return list(worker_loader(stream, stream.loader_workers)) if workers else list(stream)


def test_exact_epoch_two_ranks_two_workers_sees_every_sample_once(default_data, minilm_folder):
    config = _config(default_data, minilm_folder, vl_per_batch=7)
    per_rank = [_epoch(config, rank, 2) for rank in range(2)]
    keys = [k for batches in per_rank for b in batches for k in b.keys]
    assert len(keys) == 160 and len(set(keys)) == 160
    assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts: no rank waits for another
    for batches in per_rank:
        for b in batches:
            assert b.batch.input_ids.shape[0] == len(b.keys) + 8 if not b.padding else True


def test_exact_epoch_reshuffles_shards_each_epoch_but_stays_complete(default_data, minilm_folder):
    config = _config(default_data, minilm_folder)
    first = [k for b in _epoch(config, epoch=0) for k in b.keys]
    second = [k for b in _epoch(config, epoch=1) for k in b.keys]
    assert sorted(first) == sorted(second) and first != second


def test_fewer_shards_than_slots_and_uneven_shards(default_data, minilm_folder, tmp_path):
    """3 uneven shards for 2 ranks x 2 workers: every slot still gets data, every sample once."""
    folder = tmp_path / "few"
    folder.mkdir()
    sizes = json.loads((default_data / "vl/train/sizes.json").read_text())
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        shutil.copy(default_data / "vl/train" / name, folder / name)
    # make shard 2 uneven: keep its first 7 samples
    members = []
    with tarfile.open(folder / "shard-000002.tar") as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    keys = sorted({m.name.split(".")[0] for m, _ in members})[:7]
    with tarfile.open(folder / "shard-000002.tar", "w") as tar:
        for m, data in members:
            if m.name.split(".")[0] in keys:
                tar.addfile(m, io.BytesIO(data))
    (folder / "sizes.json").write_text(json.dumps({"shard-000000.tar": sizes["shard-000000.tar"],
                                                   "shard-000001.tar": sizes["shard-000001.tar"],
                                                   "shard-000002.tar": 7}))
    config = _config(default_data, minilm_folder, vl_sources=[SourceSpec(str(folder))], vl_per_batch=4)
    plan = plan_exact_epoch([str(folder / n) for n in sorted(p.name for p in folder.glob("*.tar"))],
                            {str(folder / k): v for k, v in json.loads((folder / "sizes.json").read_text()).items()},
                            8, 0, config.seed)  # 2 ranks x 4 readers per micro-batch slot
    assert all(sum(p.count for p in pieces) > 0 for pieces in plan)
    per_rank = [_epoch(config, rank, 2) for rank in range(2)]
    seen = [k for batches in per_rank for b in batches for k in b.keys]
    assert len(seen) == 47 and len(set(seen)) == 47
    assert len(per_rank[0]) == len(per_rank[1])


def test_resume_mid_epoch_continues_the_same_stream(default_data, minilm_folder):
    config = _config(default_data, minilm_folder, vl_per_batch=6)
    full = _epoch(config)
    first = ResumableLoader(PretrainStream(config))
    for _ in range(5):
        next(first)
    state = first.state_dict()
    first.close()
    again = ResumableLoader(PretrainStream(config))
    again.load_state_dict(state)
    resumed = [next(again) for _ in range(len(full) - 5)]
    again.close()
    assert [b.keys for b in resumed] == [b.keys for b in full[5:]]
    for a, b in zip(full[5:], resumed, strict=True):
        assert torch.equal(a.batch.input_ids, b.batch.input_ids)
        assert torch.equal(a.batch.mlm_labels, b.batch.mlm_labels)
        assert torch.equal(a.batch.region_masked, b.batch.region_masked)


def test_without_workers_the_order_matches_the_dataloader(default_data, minilm_folder):
    config = _config(default_data, minilm_folder)
    assert [b.keys for b in _epoch(config)] == [b.keys for b in _epoch(config, workers=False)]


def test_resampled_mode_weights_and_epoch_length(default_data, minilm_folder):
    train, val = str(default_data / "vl/train"), str(default_data / "vl/val")
    config = _config(default_data, minilm_folder, mode="resampled", samples_per_epoch=400, shuffle_buffer=1,
                     vl_sources=[SourceSpec(train, 3.0), SourceSpec(val, 1.0)])
    batches = _epoch(config)
    assert len(batches) == 50
    shards = Counter("val" if "/vl/val/" in s else "train" for b in batches for s in b.shards)
    # val has 2 shards of 20, train 8 of 20; draws are per shard with weights 3:1
    assert 0.6 < shards["train"] / sum(shards.values()) < 0.9


def _corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    # 1) a shard cut in the middle (a crashed upload)
    data = (dst / "shard-000001.tar").read_bytes()
    (dst / "shard-000001.tar").write_bytes(data[: len(data) // 2])
    # 2) a shard with broken samples appended
    with tarfile.open(dst / "shard-000003.tar", "a") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        meta = {"format": 1, "kind": "vl", "caption": "a red circle", "image_width": 320, "image_height": 240}
        add("bad_nan.json", json.dumps(meta).encode())
        buffer = io.BytesIO()
        np.save(buffer, np.array([[1, 1, 5, 5]], dtype=np.float32))
        add("bad_nan.boxes.npy", buffer.getvalue())
        buffer = io.BytesIO()
        np.save(buffer, np.full((1, 2048), np.nan, dtype=np.float16))
        add("bad_nan.features.npy", buffer.getvalue())
        add("bad_pickle.json", json.dumps(meta).encode())
        add("bad_pickle.pickle", b"\x80\x04K\x01.")
        add("bad_garbage.json", b"{not json")
        add("../escape.json", b"{}")
    sizes = json.loads((dst / "sizes.json").read_text())  # the appended samples are listed, as a writer would
    sizes["shard-000003.tar"] += 3
    (dst / "sizes.json").write_text(json.dumps(sizes))


def test_corrupt_and_truncated_shards_do_not_stop_a_run(default_data, minilm_folder, tmp_path):
    folder = tmp_path / "corrupt"
    _corrupt_copy(default_data / "vl/train", folder)
    config = _config(default_data, minilm_folder, vl_sources=[SourceSpec(str(folder))])
    per_rank = [_epoch(config, rank, 2) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    skipped = Counter()
    for batches in per_rank:
        for b in batches:
            skipped.update(b.skipped)
    assert skipped["broken_shard"] == 1
    assert skipped["nonfinite_features"] == 1
    assert skipped["unsafe_member"] == 1
    assert skipped["bad_json"] == 1
    assert skipped["unsafe_member_name"] == 1
    seen = [k for batches in per_rank for b in batches for k in b.keys]
    assert len(seen) == len(set(seen)) and 140 <= len(seen) < 160  # the cut shard lost its second half
    for batches in per_rank:
        for b in batches:
            assert torch.isfinite(b.batch.region_features).all()


def test_loader_batches_train_the_model(default_data, minilm_folder):
    config = _config(default_data, minilm_folder)
    batch = next(iter(build_loader(config)[1])).batch
    assert batch.has_image.tolist() == [True] * 8 + [False] * 8
    assert not batch.region_masked[:, 0].any() and not batch.mrc_select[:, 0].any()  # RoI 0 never masked
    model = VLBertForPretraining(VLBertConfig.preset("tiny", num_region_classes=25))
    out = model(batch)
    assert set(out.losses) == {"mlm_vl", "mlm_text", "mrc"} and torch.isfinite(out.loss)
    out.loss.backward()


def test_end_to_end_batches_carry_images(default_data, minilm_folder):
    config = _config(default_data, minilm_folder, example=ExampleConfig(num_region_classes=25,
                                                                        visual_front_end="end_to_end"),
                     num_workers=0, vl_per_batch=2, text_per_batch=2)
    batch = next(iter(PretrainStream(config))).batch
    assert batch.images.shape == (2, 3, 240, 320) and batch.region_features is None
    model = VLBertForPretraining(VLBertConfig.preset("tiny", num_region_classes=25, visual_front_end="end_to_end"))
    assert torch.isfinite(model(batch).loss)


def test_whole_image_feature_is_the_mean_of_visible_boxes(default_data, minilm_folder):
    config = _config(default_data, minilm_folder, num_workers=0, vl_per_batch=16)
    compact = next(iter(PretrainStream(config))).batch
    assert compact.region_features.dtype == torch.int8  # stored precision (format 2), widened by the model
    assert bool((compact.region_features[:, 0] == 0).all())  # RoI 0 is left to the device
    batch = compact.widened(config.example.num_region_classes)
    checked = 0
    for row in range(16):
        valid = batch.region_mask[row]
        visible = valid.clone()
        visible[0] = False
        visible &= ~batch.region_masked[row]
        if batch.region_masked[row].any():
            checked += 1
        # truncation never cuts these tiny scenes, so every box is still present
        expected = batch.region_features[row, visible].float().sum(0) / (visible.sum() + 1e-5)
        assert torch.allclose(batch.region_features[row, 0].float(), expected, atol=1e-5, rtol=1e-5)
    assert checked > 0


def test_bad_loader_config(default_data, minilm_folder, tmp_path):
    with pytest.raises(ValueError, match="matches no shard"):
        PretrainStream(_config(default_data, minilm_folder, vl_sources=[SourceSpec(str(tmp_path / "x-{0..3}.tar"))]))
    with pytest.raises(ValueError, match="samples_per_epoch"):
        PretrainStream(_config(default_data, minilm_folder, mode="resampled"))
    (tmp_path / "nosizes").mkdir()
    shutil.copy(default_data / "vl/train/shard-000000.tar", tmp_path / "nosizes")
    with pytest.raises(ValueError, match=r"sizes\.json"):
        PretrainStream(_config(default_data, minilm_folder, vl_sources=[SourceSpec(str(tmp_path / "nosizes"))]))


def test_a_read_that_fails_mid_shard_reopens_and_seeks_back(tmp_path):
    """ResumableReader: the handle breaks after 100 bytes twice; the bytes come out whole and in order."""
    from vlbert_ds.data import storage

    payload = bytes(range(256)) * 40
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    retries = []
    reader = storage.ResumableReader(str(path), attempts=4, base_delay=0.01,
                                     on_retry=lambda url, err: retries.append(str(err)))

    class Flaky:
        def __init__(self, inner, budget):
            self.inner, self.budget = inner, budget

        def read(self, size=-1):
            if self.budget <= 0:
                raise ConnectionError("connection reset by peer")
            data = self.inner.read(min(size, self.budget))
            self.budget -= len(data)
            return data

        def seek(self, offset):
            return self.inner.seek(offset)

        def close(self):
            self.inner.close()

    reader.handle = Flaky(reader.handle, 100)
    out = reader.read(150)  # 100 bytes, then a reset: reopened at byte 100
    out += reader.read(len(payload))
    assert out == payload
    assert len(retries) == 1 and "reset" in retries[0]


def test_bad_images_missing_members_and_long_captions_are_counted_never_fatal(default_data, minilm_folder, tmp_path):
    """End-to-end mode: a garbage JPEG, a decompression bomb (header claims 30000 x 30000), a sample
    without boxes, and a 3,000-word caption (truncated to the 64-element budget, not dropped)."""
    from PIL import Image

    folder = tmp_path / "bad-images"
    shutil.copytree(default_data / "vl/train", folder)
    meta = {"format": 1, "kind": "vl", "caption": "a red circle", "image_width": 320, "image_height": 240}
    boxes = io.BytesIO()
    np.save(boxes, np.array([[1, 1, 50, 50]], dtype=np.float32))
    bomb = io.BytesIO()
    Image.new("L", (30000, 30000)).save(bomb, format="JPEG", quality=1)
    good_jpeg = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 30, 30)).save(good_jpeg, format="JPEG")
    long_meta = dict(meta, caption=" ".join(["red"] * 3000))
    with tarfile.open(folder / "shard-000002.tar", "a") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for key, sample_meta, jpeg, with_boxes in (("bad_garbage_jpeg", meta, b"\xff\xd8 not a jpeg", True),
                                                   ("bad_bomb", meta, bomb.getvalue(), True),
                                                   ("bad_no_boxes", meta, good_jpeg.getvalue(), False),
                                                   ("long_caption", long_meta, good_jpeg.getvalue(), True)):
            add(f"{key}.json", json.dumps(sample_meta).encode())
            if with_boxes:
                add(f"{key}.boxes.npy", boxes.getvalue())
            add(f"{key}.jpg", jpeg)
    sizes = json.loads((folder / "sizes.json").read_text())  # listed, as a writer would
    sizes["shard-000002.tar"] += 4
    (folder / "sizes.json").write_text(json.dumps(sizes))
    config = _config(default_data, minilm_folder, vl_sources=[SourceSpec(str(folder))], num_workers=0,
                     example=ExampleConfig(num_region_classes=25, visual_front_end="end_to_end"))
    batches = _epoch(config, workers=False)
    skipped = Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert skipped["bad_image"] == 1 and skipped["image_too_large"] == 1 and skipped["missing_boxes"] == 1
    keys = [k for b in batches for k in b.keys]
    assert any(k.endswith("long_caption") for k in keys)
    for b in batches:
        elements = b.batch.text_mask.sum(1) + b.batch.region_mask.sum(1)
        assert int(elements.max()) <= 64


def test_a_pattern_naming_shards_that_do_not_exist_is_refused_naming_them(default_data, minilm_folder):
    pattern = f"{default_data}/vl/train/shard-{{000000..000099}}.tar"  # 100 named, the folder holds fewer
    existing = len(list((default_data / "vl/train").glob("*.tar")))
    with pytest.raises(ValueError, match=rf"{100 - existing} of its 100 shards do not exist \(.*shard-0000"):
        PretrainStream(_config(default_data, minilm_folder, vl_sources=[SourceSpec(pattern)]))


@pytest.mark.parametrize("claimed", [1, 500])
def test_exact_mode_counts_a_wrong_sizes_json_and_drops_nothing_silently(claimed, default_data, minilm_folder,
                                                                         tmp_path, caplog):
    folder = tmp_path / "vl"
    shutil.copytree(default_data / "vl/train", folder)
    truth = json.loads((folder / "sizes.json").read_text())
    (folder / "sizes.json").write_text(json.dumps({name: claimed for name in truth}))
    config = _config(default_data, minilm_folder, vl_sources=[SourceSpec(str(folder))], vl_per_batch=4)
    batches = _epoch(config, workers=False)
    delivered = [k for b in batches for k in b.keys]
    skipped = Counter()
    for b in batches:
        skipped.update(b.skipped)
    assert skipped["sizes_mismatch"] == len(truth)  # every shard's entry is wrong
    total = sum(truth.values())
    assert len(set(delivered)) == len(delivered)
    assert len(delivered) + skipped["sizes_mismatch_dropped"] == total  # each sample delivered or counted
    if claimed == 1:
        assert skipped["sizes_mismatch_dropped"] == total - len(truth) * claimed
    else:
        assert len(delivered) == total and sum(b.padding for b in batches) > 0
    assert "sizes.json is wrong for" in caplog.text


def test_caption_pieces_equal_the_tokenizers_own_encoding_even_past_128_pieces(minilm_folder):
    """The loader calls the Rust tokenizer directly; MiniLM's tokenizer.json truncates and pads to 128,
    which the Python wrapper switches off per call and the loader must switch off itself."""
    from vlbert_ds.data.examples import TokenizerTools

    tools = TokenizerTools(minilm_folder)
    captions = ["a man riding a wave on top of a surfboard", "Unbelievably, tokenization-heavy text: 12,345!",
                " ".join(["surfboard"] * 150)]
    ours = [tools.caption_pieces(c) for c in captions]  # before the wrapper has ever run
    for caption, (ids, starts) in zip(captions, ours, strict=True):
        encoding = tools.tokenizer(caption, add_special_tokens=False)
        words = encoding.word_ids()
        assert ids.tolist() == encoding["input_ids"]
        assert starts.tolist() == [i == 0 or words[i] != words[i - 1] for i in range(len(words))]
    assert ours[2][0].size == 300  # "surf ##board" x 150, not cut at 128
