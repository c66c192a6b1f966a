"""Shard format 2: compact region features and sparse class distributions, widened on the device."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vlbert_ds.data.examples import ExampleConfig, TokenizerTools, collate, make_vl_example, sample_rng
from vlbert_ds.data.schema import (
    Compaction,
    SampleError,
    VLRecord,
    decode_vl,
    dequantize_features,
    encode_vl,
    npy_bytes,
    quantize_features,
    sparse_classes,
)


def bua_like_record(boxes: int = 50, dim: int = 2048, classes: int = 1601, seed: int = 0) -> VLRecord:
    """A bottom-up-attention-sized sample: ReLU-like features, peaked class distributions."""
    rng = np.random.default_rng(seed)
    features = np.maximum(rng.normal(0.0, 1.0, (boxes, dim)), 0).astype(np.float32) * rng.uniform(0.5, 8, (boxes, 1))
    scores = rng.dirichlet(np.full(classes, 0.003), size=boxes).astype(np.float32)
    xy = rng.uniform(0, 300, (boxes, 2))
    box_array = np.concatenate((xy, xy + rng.uniform(10, 100, (boxes, 2))), 1).astype(np.float32)
    return VLRecord(key="000000_000000", caption="a man riding a horse on the beach", image_width=500,
                    image_height=400, boxes=box_array, scores=scores, features=features)


def format_1_sample(record: VLRecord) -> dict:
    """A sample as format 1 wrote it (docs/shard-format.md of version 1), by hand."""
    meta = {"format": 1, "kind": "vl", "caption": record.caption, "image_width": record.image_width,
            "image_height": record.image_height, "num_boxes": int(record.boxes.shape[0])}
    return {"__key__": record.key, "json": json.dumps(meta).encode(), "boxes.npy": npy_bytes(record.boxes),
            "scores.npy": npy_bytes(record.scores.astype(np.float16)),
            "features.npy": npy_bytes(record.features.astype(np.float16))}


def test_int8_codes_are_within_half_a_step_of_the_feature():
    record = bua_like_record()
    codes, scale = quantize_features(record.features, "int8")
    assert codes.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_allclose(scale, np.abs(record.features).max(1) / 127, rtol=1e-6)
    error = np.abs(dequantize_features(codes, scale, "int8") - record.features)
    # Rounding to the nearest of steps `scale` apart: at most half a step (plus float32 rounding).
    assert (error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-7).all()
    assert codes.max() == 127  # each box uses the whole range


def test_float8_codes_keep_three_mantissa_bits():
    record = bua_like_record()
    codes, scale = quantize_features(record.features, "float8")
    assert codes.dtype == np.uint8
    restored = dequantize_features(codes, scale, "float8")
    error = np.abs(restored - record.features)
    # e4m3: 3 mantissa bits, round to nearest -> relative error <= 2^-4 for normal codes; subnormal
    # codes (below 2^-6) are 2^-9 apart -> absolute error <= 2^-10 in code units.
    bound = np.maximum(np.abs(record.features) * 2.0 ** -4, scale[:, None] * 2.0 ** -10)
    assert (error <= bound * (1 + 1e-5) + 1e-7).all()
    np.testing.assert_allclose(np.abs(restored).max(1), np.abs(record.features).max(1), rtol=1e-6)


def test_top_k_keeps_the_largest_classes_renormalised():
    scores = np.array([[0.5, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    ids, probs = sparse_classes(scores, 2)
    assert ids.tolist() == [[0, 2], [0, 1]]
    np.testing.assert_allclose(probs.astype(np.float32), [[0.625, 0.375], [0.0, 0.0]], atol=1e-3)
    with pytest.raises(ValueError, match="top-k 5 is larger than the 4 classes"):
        Compaction(class_topk=5).topk_for(4)
    assert Compaction().topk_for(1601) == 32 and Compaction().topk_for(25) == 0  # default: dense when small


def test_a_bua_like_sample_is_over_3x_smaller_at_the_default_settings():
    record = bua_like_record()
    before = sum(len(v) for k, v in format_1_sample(record).items() if not k.startswith("__"))
    after = sum(len(v) for k, v in encode_vl(record).items() if not k.startswith("__"))
    # 50 x 2048 x 2 + 50 x 1601 x 2 bytes before; 50 x 2048 + 50 x 4 + 50 x 32 x (2 + 2) after.
    assert before > 50 * (2048 + 1601) * 2 and after < 50 * (2048 + 4 + 32 * 4) + 2000
    assert before / after >= 3.0


def test_format_1_samples_still_decode():
    record = bua_like_record(boxes=6, dim=16, classes=10)
    decoded = decode_vl(format_1_sample(record), need_features=True, need_image=False)
    assert decoded.feature_scale is None and decoded.features.dtype == np.float16
    np.testing.assert_array_equal(decoded.scores, record.scores.astype(np.float16))


@pytest.mark.parametrize("dtype", ["int8", "float8"])
def test_a_compact_batch_widens_on_the_device_to_the_format_1_batch(tokenizer, minilm_folder, dtype):
    """Same sample, same masks: the widened format-2 batch equals the format-1 batch within the
    quantisation error, RoI 0 (mean of the visible boxes) and the class targets included."""
    tools = TokenizerTools(minilm_folder)
    record = bua_like_record(boxes=12, dim=32, classes=10, seed=3)
    config = ExampleConfig(num_region_classes=10)
    old = decode_vl(format_1_sample(record), need_features=True, need_image=False)
    new = decode_vl(encode_vl(record, Compaction(dtype, class_topk=10)), need_features=True, need_image=False)
    assert new.class_ids is not None and new.scores is None
    for seed in range(20):  # until the masks hide and select some boxes
        a = make_vl_example(old, tools, config, sample_rng(seed, 0, record.key))
        b = make_vl_example(new, tools, config, sample_rng(seed, 0, record.key))
        if a.region_hidden.any() and a.region_selected.any():
            break
    np.testing.assert_array_equal(a.region_hidden, b.region_hidden)
    old_batch, new_batch = collate([a], []), collate([b], [])
    assert new_batch.region_features.dtype == {"int8": torch.int8, "float8": torch.float8_e4m3fn}[dtype]
    assert new_batch.mrc_target_classes is not None and new_batch.mrc_targets.shape[1] == 10
    wide = new_batch.widened(10)
    # Expected, from the float32 features: RoI 0 = mean over the boxes the mask leaves visible.
    visible = ~a.region_hidden[1:]
    expected = np.concatenate((record.features[visible].mean(0, keepdims=True), record.features))
    step = np.abs(record.features).max(1) / (127 if dtype == "int8" else 448)
    per_box = np.maximum(step / 2 if dtype == "int8" else np.abs(record.features).max(1) * 2.0 ** -4, 1e-3)
    tolerance = np.concatenate(([per_box.max()], per_box))[:, None]
    assert (np.abs(wide.region_features[0].numpy() - expected) <= tolerance).all()
    np.testing.assert_allclose(old_batch.region_features[0].float().numpy(), expected,
                               atol=float(np.abs(expected).max()) * 2 ** -10)
    np.testing.assert_allclose(wide.mrc_targets.numpy(), old_batch.mrc_targets.numpy(), atol=2e-3)


def test_the_model_takes_compact_batches(minilm_folder):
    from vlbert_ds.model import VLBertConfig, VLBertForPretraining

    tools = TokenizerTools(minilm_folder)
    config = VLBertConfig.preset("tiny", num_region_classes=10, precomputed_feature_dim=32)
    model = VLBertForPretraining(config).eval()
    record = bua_like_record(boxes=8, dim=32, classes=10, seed=5)
    examples = ExampleConfig(num_region_classes=10)
    compact = decode_vl(encode_vl(record, Compaction("int8", class_topk=4)), need_features=True, need_image=False)
    batch = collate([make_vl_example(compact, tools, examples, sample_rng(s, 0, record.key)) for s in range(3)], [])
    with torch.no_grad():
        out = model(batch)
        same = model(batch.widened(10))
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(same.loss.item(), rel=1e-6)


def test_bad_compact_samples_are_refused_with_a_reason():
    record = bua_like_record(boxes=4, dim=8, classes=10)
    sample = encode_vl(record, Compaction("float8", class_topk=3))
    nan_codes = np.frombuffer(sample["features.npy"][-32:], np.uint8).copy()
    broken = dict(sample, **{"features.npy": sample["features.npy"][:-32] + bytes([0x7F]) + nan_codes[1:].tobytes()})
    with pytest.raises(SampleError) as err:
        decode_vl(broken, need_features=True, need_image=False)
    assert err.value.reason == "nonfinite_features"
    meta = json.loads(sample["json"])
    wrong = dict(sample, json=json.dumps({**meta, "num_classes": 2}).encode())
    with pytest.raises(SampleError) as err:
        decode_vl(wrong, need_features=False, need_image=False)
    assert err.value.reason == "bad_scores"
    unscaled = {k: v for k, v in sample.items() if k != "feature_scale.npy"}
    with pytest.raises(SampleError) as err:
        decode_vl(unscaled, need_features=True, need_image=False)
    assert err.value.reason == "bad_features"


def test_prep_refuses_a_top_k_above_the_class_count(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlbert_ds.prep.cli", "default", "--out", str(tmp_path / "d"),
                             "--num-images", "4", "--num-val-images", "2", "--num-text-segments", "4",
                             "--processes", "1", "--class-topk", "30"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "class top-k 30 is larger than the 25 classes" in result.stderr


def write_format_1_shards(folder, records_per_shard: list[list[VLRecord]]) -> None:
    import webdataset as wds

    folder.mkdir(parents=True)
    sizes = {}
    for index, records in enumerate(records_per_shard):
        name = f"shard-{index:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False) as sink:
            for record in records:
                sample = format_1_sample(record)
                meta = json.loads(sample["json"])
                sample["json"] = json.dumps({**meta, "source": {"image_id": record.key}}).encode()
                sink.write(sample)
        (folder / f"shard-{index:06d}_stats.json").write_text(json.dumps({"kind": "vl", "successes": len(records)}))
        sizes[name] = len(records)
    (folder / "sizes.json").write_text(json.dumps(sizes))
    (folder / "classes.json").write_text(json.dumps({"num_classes": 1601}))


def test_convert_rewrites_format_1_shards_compactly(tmp_path):
    from dataclasses import replace

    records = [[replace(bua_like_record(boxes=20, seed=s * 10 + i), key=f"{s:06d}_{i:06d}") for i in range(5)]
               for s in range(2)]
    source, out = tmp_path / "v1", tmp_path / "v2"
    write_format_1_shards(source, records)
    command = [sys.executable, "-m", "vlbert_ds.prep.cli", "convert", str(source), "--out", str(out),
               "--to-format", "2", "--processes", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 5, "shard-000001.tar": 5}
    assert (out / "classes.json").exists()
    before = sum(f.stat().st_size for f in source.glob("*.tar"))
    after = sum(f.stat().st_size for f in out.glob("*.tar"))
    assert before / after >= 3.0
    from vlbert_ds.data.streams import ReadSettings, ShardPiece, SkipCounter, read_indexed

    converted = [s for shard in sorted(out.glob("*.tar"))
                 for _, s in read_indexed(ShardPiece(str(shard), 5), ReadSettings(), SkipCounter())]
    assert [s["__key__"] for s in converted] == [r.key for shard in records for r in shard]
    for sample, record in zip(converted, [r for shard in records for r in shard], strict=True):
        decoded = decode_vl(sample, need_features=True, need_image=False)
        assert decoded.feature_dtype == "int8" and decoded.class_ids.shape == (20, 32)
        assert json.loads(sample["json"])["source"] == {"image_id": record.key}
        step = np.abs(record.features.astype(np.float16).astype(np.float32)).max(1) / 127
        assert (np.abs(decoded.dense_features() - record.features) <= step[:, None] / 2 + 0.01).all()
        top = np.argsort(-record.scores.astype(np.float16).astype(np.float32), 1, kind="stable")[:, :32]
        np.testing.assert_array_equal(np.sort(decoded.class_ids, 1), np.sort(top, 1))
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 already done" in again.stdout


def test_shards_with_other_feature_widths_stop_training_before_it_starts(default_data, tmp_path):
    """Shards of 2048-d features for a model that takes 1024: refused at start-up, naming the key to set."""
    from vlbert_ds.data import PretrainStream
    from vlbert_ds.data.pipeline import UnusableDataError
    from vlbert_ds.train.config import PretrainConfig, load_config
    from vlbert_ds.train.pretrain import loader_config

    overrides = [f"data.vl_sources=[{default_data}/vl/train]", f"data.text_sources=[{default_data}/text/train]",
                 "model.num_region_classes=25", "model.overrides={precomputed_feature_dim: 1024}",
                 "data.samples_per_epoch=64", "data.num_workers=0"]
    config = load_config(None, overrides, PretrainConfig)

    with pytest.raises(UnusableDataError, match=r"feature_dim_mismatch.*model\.overrides\.precomputed_feature_dim"):
        PretrainStream(loader_config(config), check_sources=True)


def test_the_grounding_check_sees_the_same_features_from_int8_and_float16_shards(default_data, tmp_path,
                                                                                minilm_folder):
    from vlbert_ds.prep.convert import convert_dataset
    from vlbert_ds.prep.default import GROUNDING_WORDS
    from vlbert_ds.train.grounding import build_grounding_set

    wide = tmp_path / "float16"
    convert_dataset(str(default_data / "vl/val"), str(wide), Compaction("float16", 0))
    sets = [build_grounding_set(str(folder), GROUNDING_WORDS, str(minilm_folder), "precomputed", 25,
                                max_samples=32) for folder in (default_data / "vl/val", wide)]
    compact, reference = (s.with_image[0] for s in sets)
    assert compact.region_features.dtype == torch.int8 and reference.region_features.dtype == torch.float16
    got = compact.widened(25).region_features
    expected = reference.region_features.float()
    mask = reference.region_mask
    # int8 steps are max|x| / 127 of each box: within half a step (RoI 0, a mean, too)
    step = expected.abs().amax(-1, keepdim=True) / 127
    assert bool(((got - expected).abs() <= step / 2 + 2e-3)[mask].all())
