"""The world-size free sample order (data/elastic.py) at the loader level: same global steps on 1, 2 or 4
ranks and any worker count, a resume across a world-size change, and a resume that decodes nothing it took."""

from __future__ import annotations

from collections import Counter

import pytest

from vlbert_ds.data import ExampleConfig, LoaderConfig, PretrainStream, ResumableLoader, SourceSpec, pipeline
from vlbert_ds.data.elastic import Layout, LayoutError, epoch_steps_exact, reader_batches_before
from vlbert_ds.data.pipeline import DataPositionMismatch
from vlbert_ds.data.streams import worker_loader


def _config(data, minilm_folder, **overrides) -> LoaderConfig:
    base = dict(vl_sources=[SourceSpec(str(data / "vl/train"))], text_sources=[SourceSpec(str(data / "text/train"))],
                tokenizer=str(minilm_folder), mode="exact", vl_per_batch=8, text_per_batch=8, num_workers=0,
                shuffle_buffer=16, readers=24, example=ExampleConfig(num_region_classes=25))
    base.update(overrides)
    return LoaderConfig(**base)


def _global_steps(config, world, accum, workers):
    """{step: {slot: (keys, input ids, text ids)}} over every rank of one epoch."""
    steps: dict[int, dict[int, tuple]] = {}
    for rank in range(world):
        stream = PretrainStream(config, rank, world, grad_accum=accum)
        items = list(worker_loader(stream, stream.loader_workers)) if workers else list(stream)
        for b in items:
            step, local = divmod(b.item, accum)
            steps.setdefault(step, {})[local * world + rank] = (tuple(b.keys), b.batch.input_ids.tolist(),
                                                                b.batch.mlm_labels.tolist())
    return steps


def test_layout_valid_world_sizes_workers_and_reader_ownership():
    layout = Layout(slots=4, readers=16)
    assert layout.valid_world_sizes() == [1, 2, 4]
    assert [layout.grad_accum(w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(LayoutError, match=r"3 ranks cannot keep it\. Valid world sizes: 1, 2, 4"):
        layout.grad_accum(3)
    assert layout.loader_workers(1, 3) == 2 and layout.loader_workers(4, 3) == 2 and layout.loader_workers(2, 0) == 0
    for world in (1, 2, 4):  # every step: each slot's reader is used by exactly one rank
        accum = 4 // world
        for step in range(8):
            readers = [layout.item_reader(step * accum + a, r, world) for r in range(world) for a in range(accum)]
            assert sorted(readers) == sorted(layout.reader_of(k, step) for k in range(4))
    # 3 readers per slot; reader 4 (phase 1) making 2 batches ends at step 1 + 3 + 1 = 5
    assert epoch_steps_exact([0, 0, 0, 0, 20, 0], 10, Layout(2, 6)) == 5
    assert [reader_batches_before(4, s, Layout(2, 6)) for s in (0, 1, 2, 4, 5)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_the_same_global_steps_on_one_two_or_four_ranks_with_any_worker_count(mode, default_data, minilm_folder):
    extra = {} if mode == "exact" else dict(samples_per_epoch=160, vl_sources=[
        SourceSpec(str(default_data / "vl/train"), 3.0), SourceSpec(str(default_data / "vl/val"), 1.0)])
    config = _config(default_data, minilm_folder, mode=mode, **extra)
    reference = _global_steps(config, 1, 4, workers=0)
    assert len(reference) >= 5
    for world, accum, workers in ((2, 2, 1), (4, 1, 3), (1, 4, 3)):
        got = _global_steps(_config(default_data, minilm_folder, mode=mode, num_workers=workers, **extra), world,
                            accum, workers)
        assert got == reference, (world, accum, workers)
    if mode == "exact":
        keys = Counter(k for step in reference.values() for slot in step.values() for k in slot[0])
        assert len(keys) == 160 and set(keys.values()) == {1}


def _resumed(config, state, world, accum):
    out = []
    for rank in range(world):
        loader = ResumableLoader(PretrainStream(config, rank, world, grad_accum=accum))
        loader.load_state_dict(state)
        stream = loader.stream
        out += [(b.item, rank, b) for b in (next(loader) for _ in range(stream.items_per_epoch() - stream.start_item))]
        loader.close()
    return out


def test_a_position_saved_on_two_ranks_continues_on_one_or_four_mid_epoch(default_data, minilm_folder):
    config = _config(default_data, minilm_folder, vl_per_batch=4, text_per_batch=4)
    reference = _global_steps(config, 1, 4, workers=0)
    loaders = [ResumableLoader(PretrainStream(config, r, 2, grad_accum=2)) for r in range(2)]
    first = [next(lo) for lo in loaders for _ in range(6)]  # 3 steps
    state = loaders[0].stream.merge_states([lo.stream.local_state() for lo in loaders])
    assert state["micro_batches"] == 12 and state["world_size"] == 2
    for world in (1, 4):
        accum = 4 // world
        rest = _resumed(config, state, world, accum)
        for item, rank, b in rest:
            step, local = divmod(item, accum)
            assert reference[step][local * world + rank][1] == b.batch.input_ids.tolist()
        keys = Counter(k for b in first for k in b.keys) + Counter(k for *_, b in rest for k in b.keys)
        assert len(keys) == 160 and set(keys.values()) == {1}


def test_a_late_resume_decodes_only_what_it_delivers(default_data, minilm_folder, monkeypatch):
    config = _config(default_data, minilm_folder, vl_per_batch=4, text_per_batch=4, readers=4)
    loader = ResumableLoader(PretrainStream(config))
    total = loader.stream.items_per_epoch()
    for _ in range(total - 2):
        next(loader)
    state = loader.state_dict()
    loader.close()
    decoded = Counter()
    real = pipeline.decode_vl

    def counting(sample, **kw):
        decoded["vl"] += 1
        return real(sample, **kw)

    monkeypatch.setattr(pipeline, "decode_vl", counting)
    again = ResumableLoader(PretrainStream(config, check_sources=False))
    again.load_state_dict(state)
    last = [next(again) for _ in range(2)]
    again.close()
    assert decoded["vl"] <= sum(len(b.keys) for b in last) + 1  # + the padding filler at most


def test_a_position_of_another_data_config_is_refused_unless_reset(default_data, minilm_folder):
    config = _config(default_data, minilm_folder)
    loader = ResumableLoader(PretrainStream(config))
    next(loader)
    state = loader.state_dict()
    loader.close()
    other = _config(default_data, minilm_folder, seed=7)
    with pytest.raises(DataPositionMismatch, match="seed: saved 12345, now 7"):
        PretrainStream(other).load_state_dict(state)
    reset = PretrainStream(_config(default_data, minilm_folder, seed=7, reset_position=True))
    reset.load_state_dict(state)
    assert reset.epoch == 1 and reset.start_item == 0


def _task_steps(folder, world, accum, steps, state=None):
    from vlbert_ds.bundled import default_bert
    from vlbert_ds.data.task_batches import TaskDataConfig, task_loader

    config = TaskDataConfig(task="refcoco", tokenizer=default_bert(), batch_size=4, num_workers=0, shuffle_buffer=16)
    out: dict[int, dict[int, tuple]] = {}
    loaders = [task_loader(str(folder), config, rank, world, accum) for rank in range(world)]
    for rank, loader in enumerate(loaders):
        if state is not None:
            loader.load_state_dict(state)
        for _ in range(steps * accum):
            b = next(loader)
            step, local = divmod(b.item, accum)
            out.setdefault(step, {})[local * world + rank] = (tuple(b.task.keys), b.task.batch.input_ids.tolist())
    merged = loaders[0].stream.merge_states([lo.stream.local_state() for lo in loaders])
    for loader in loaders:
        loader.close()
    return out, merged


def test_fine_tuning_batches_follow_the_same_global_order_and_resume_on_another_world_size(synthetic_tasks):
    """RefCOCO+ training stream (endless readers, each on its own epochs): 2 ranks == 1 rank x 2, and a
    position saved on 2 ranks after 30 steps (past the readers' first epoch) continues on 1 rank."""
    folder = synthetic_tasks / "refcoco/train"
    reference, _ = _task_steps(folder, 1, 2, 40)
    two, _ = _task_steps(folder, 2, 1, 40)
    assert two == reference
    _, state = _task_steps(folder, 2, 1, 30)
    assert state["micro_batches"] == 60
    assert any(epoch >= 1 for epoch, _ in state["readers"].values())  # some reader is in its second epoch
    rest, _ = _task_steps(folder, 1, 2, 10, state)
    assert rest == {step: reference[step] for step in range(30, 40)}
