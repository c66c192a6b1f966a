"""Run config, DeepSpeed JSON filling, optimizer groups and the schedule (no processes started)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from torch import nn

from vlbert_ds.train.config import load_config, read_ds_config
from vlbert_ds.train.engine import build_ds_config, lr_lambda, parameter_groups


def test_yaml_with_overrides_and_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  vl_sources: [a/b]\n  vl_per_batch: 8\ntrain:\n  steps: 10\n")
    config = load_config(path, ["train.steps=20", "optimizer.lr=3e-4", "optimizer.betas=[0.9, 0.98]",
                                "train.precision=fp32", 'model.overrides={"hidden_dropout_prob": 0.0}'])
    assert config.train.steps == 20 and config.optimizer.lr == 3e-4 and config.optimizer.betas == [0.9, 0.98]
    assert config.data.vl_per_batch == 8 and config.model.overrides == {"hidden_dropout_prob": 0.0}
    assert "train.steps" in config.flat() and config.flat()["optimizer.betas"] == "[0.9, 0.98]"
    config = load_config(None, ["data.vl_sources=[s3://b/x-{000..009}.tar, s3://b/y-{a,b}.tar]",
                                "data.text_sources=s3://b/text"])
    assert config.data.vl_sources == ["s3://b/x-{000..009}.tar", "s3://b/y-{a,b}.tar"]
    assert config.data.text_sources == ["s3://b/text"]
    toml = tmp_path / "run.toml"
    toml.write_text('[data]\nvl_sources = ["x"]\n[train]\nsteps = 7\n')
    assert load_config(toml).train.steps == 7


@pytest.mark.parametrize(("override", "message"), [
    ("train.stepz=3", "unknown key train.stepz"),
    ("trian.steps=3", "unknown section"),
    ("train.steps=many", "train.steps must be int"),
    ("train.precision=fp8", "train.precision"),
    ("data.mode=sometimes", "data.mode"),
    ("steps=3", "section.key=value"),
])
def test_bad_config_is_rejected_before_work(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["data.vl_sources=[x]", override])


def test_ds_config_filled_from_run_config_and_contradictions_refused():
    config = load_config(None, ["data.vl_sources=[x]", "data.vl_per_batch=6", "data.text_per_batch=2",
                                "train.grad_accum=3", "train.precision=bf16", "optimizer.grad_clip=1.5"])
    from vlbert_ds.train.pretrain import PretrainRecipe

    micro = PretrainRecipe(config).micro_batch_size()  # the rows of one micro-batch, from the data section

    def build_ds_config_of(template):
        return build_ds_config(config.train, config.optimizer, micro, 4, template)

    ds = build_ds_config_of(read_ds_config("ds_configs/zero2.json"))
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4 and ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu"):
        build_ds_config_of({"train_micro_batch_size_per_gpu": 16})
    with pytest.raises(ValueError, match=r"fp16\.enabled"):
        build_ds_config_of({"fp16": {"enabled": True}})
    with pytest.raises(ValueError, match="optimizer"):
        build_ds_config_of({"optimizer": {"type": "Adam"}})
    for name in ("zero1", "zero2", "zero3", "zero2_offload"):
        assert "zero_optimization" in json.loads(Path(f"ds_configs/{name}.json").read_text())


def test_lr_schedule_warmup_then_linear_decay():
    factor = lr_lambda(warmup=4, total=20, schedule="linear")
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and factor(12) == 0.5 and factor(20) == 0.0
    assert lr_lambda(2, 10, "constant")(9) == 1.0


def test_weight_decay_spares_norms_and_biases_unless_asked():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = parameter_groups(model, 0.01, decay_norm_and_bias=False)
    decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    groups = parameter_groups(model, 0.01, decay_norm_and_bias=True)
    assert sum(len(g["params"]) for g in groups if g["weight_decay"]) == 6  # the official behaviour
    groups = parameter_groups(model, 0.01, False, fresh={"2.weight"}, fresh_lr_multiplier=10.0)
    scaled = [p for g in groups if g["lr_scale"] == 10.0 for p in g["params"]]
    assert scaled == [model[2].weight]


def test_the_cpu_optimizer_is_torch_fused_adamw_and_steps_like_the_default_one():
    """One fused pass over the flat ZeRO partition instead of one per operation (benchmarks/optimizer_step.py), the same
    update: three steps of the trainer's optimizer against torch's default AdamW with the same groups."""
    import torch

    from vlbert_ds.train.config import OptimizerSection
    from vlbert_ds.train.engine import build_optimizer

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
    section = OptimizerSection(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(models[0], section, offload=False)
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    index = {id(p): i for i, p in enumerate(models[0].parameters())}
    other = list(models[1].parameters())  # the same groups, over the twin model's parameters
    plain = torch.optim.AdamW([{**{k: v for k, v in g.items() if k not in ("params", "fused")},
                                "params": [other[index[id(p)]] for p in g["params"]]} for g in fused.param_groups],
                              lr=section.lr, betas=tuple(section.betas), eps=section.eps)
    for _ in range(3):
        for model, optimizer in zip(models, (fused, plain), strict=True):
            optimizer.zero_grad()
            model(torch.arange(6.0).view(2, 3)).square().sum().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6) and not torch.equal(a, torch.zeros_like(a))


def test_credentials_in_urls_never_reach_the_printed_config_or_mlflow_params():
    from vlbert_ds.train.config import load_config
    from vlbert_ds.train.tracking import redact

    config = load_config(None, ["data.vl_sources=[s3://AKIAEXAMPLE:s3cr3t@bucket/cc]",
                                "tracking.uri=https://alice:tok-123@mlflow.example.org"])
    text = config.to_yaml()
    params = redact({**config.flat(), "aws_secret_access_key": "s3cr3t"})
    for leaked in ("s3cr3t", "tok-123", "AKIAEXAMPLE"):
        assert leaked not in text
        assert all(leaked not in str(v) for v in params.values())
    assert "https://***@mlflow.example.org" in text
    assert config.tracking.uri == "https://alice:tok-123@mlflow.example.org"  # the run itself still uses it


def test_output_folders_must_be_paths_not_urls():
    from vlbert_ds.train.config import load_config

    for key in ("train.output_dir", "checkpoint.dir", "data.prepare_default"):
        with pytest.raises(ValueError, match=f"{key} must be a local or shared-filesystem path"):
            load_config(None, ["data.vl_sources=[s3://b/cc]", f"{key}=s3://bucket/run"])


def test_closed_choices_are_checked_at_load_naming_the_allowed_values(capsys):
    from vlbert_ds.cli.pretrain import main

    for override, allowed in (("data.mode=exactly", "'resampled', 'exact'"),
                              ("train.precision=fp8", "'auto', 'bf16', 'fp16', 'fp32'"),
                              ("optimizer.schedule=cosine", "'linear', 'constant'"),
                              ("model.visual_front_end=e2e", "'precomputed', 'end_to_end'")):
        assert main(["--print-config", override, "data.prepare_default=data/x"]) == 2
        section_key = override.split("=")[0]
        assert f"{section_key} must be one of {allowed}" in capsys.readouterr().err
    from vlbert_ds.cli.finetune import main as finetune_main

    for override, allowed in (("task.vcr_mode=a2q", "'q2a', 'qa2r'"),
                              ("task.object_classes=lvis", "'auto', 'coco', 'none', 'file'")):
        assert finetune_main(["--task", "vcr", "--print-config", override, "task.train=t"]) == 2
        assert f"{override.split('=')[0]} must be one of {allowed}" in capsys.readouterr().err


def test_a_key_of_the_other_command_is_an_error_naming_that_command(capsys):
    from vlbert_ds.cli.finetune import main as finetune_main
    from vlbert_ds.cli.pretrain import main as pretrain_main

    for key in ("task.train=x", "task.vcr_mode=qa2r"):
        assert pretrain_main(["--print-config", "data.prepare_default=d", key]) == 2
        assert "is for vlbert-finetune; vlbert-pretrain does not take it" in capsys.readouterr().err
    for key, name in (("data.vl_sources=[x]", "data.vl_sources"), ("grounding.samples=3", "grounding"),
                      ("model.visual_front_end=end_to_end", "model.visual_front_end")):
        assert finetune_main(["--task", "vqa", "--print-config", "task.train=t", key]) == 2
        err = capsys.readouterr().err
        assert name in err and "vlbert-pretrain" in err and "vlbert-finetune does not take it" in err
    assert pretrain_main(["--print-config", "data.prepare_default=d", "data.no_such_key=1"]) == 2
    assert "unknown key data.no_such_key" in capsys.readouterr().err


def test_help_lists_every_config_key_with_type_default_and_help(capsys):
    import dataclasses
    import typing

    from vlbert_ds.cli.finetune import main as finetune_main
    from vlbert_ds.cli.pretrain import main as pretrain_main
    from vlbert_ds.train.config import FinetuneConfig, PretrainConfig

    for main, kind in ((pretrain_main, PretrainConfig), (finetune_main, FinetuneConfig)):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        defaults = kind()
        for section in dataclasses.fields(kind):
            for key in dataclasses.fields(typing.get_type_hints(kind)[section.name]):
                value = getattr(getattr(defaults, section.name), key.name)
                line = next(x for x in text.splitlines() if x.strip().startswith(f"{section.name}.{key.name} ("))
                assert f"default {json.dumps(value)}" in line
                assert key.metadata["help"] and key.metadata["help"] in text
        if kind is PretrainConfig:  # a Literal shows its choices
            assert 'data.mode (resampled|exact, default "resampled")' in text


def test_the_resolved_config_is_frozen():
    config = load_config(None, ["data.prepare_default=data/d"])
    assert config.data.vl_sources == ["data/d/vl/train"] and config.grounding.data == "data/d/vl/val"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data.vl_per_batch = 3


def test_print_config_prints_the_resolved_config_and_exits(tmp_path, capsys):
    from vlbert_ds.cli.pretrain import main

    (tmp_path / "run.yaml").write_text("data: {prepare_default: data/d, mode: exact}\ntrain: {steps: 7}\n")
    assert main(["--config", str(tmp_path / "run.yaml"), "--print-config", "train.steps=9",
                 "data.vl_sources=[s3://user:secret@host/b/shard-{0..3}.tar]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 9 and printed["data"]["mode"] == "exact"
    assert printed["data"]["vl_sources"] == ["s3://***@host/b/shard-{0..3}.tar"]  # credentials masked
    assert printed["optimizer"]["schedule"] == "linear"  # defaults resolved too


def test_finetune_print_config_resolves_the_task(capsys):
    from vlbert_ds.cli.finetune import main

    assert main(["--task", "vcr", "--print-config", "task.train=data/vcr/train", "task.vcr_mode=qa2r"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["task"]["name"] == "vcr" and printed["task"]["vcr_mode"] == "qa2r"


@pytest.mark.parametrize("override,message", [
    ("checkpoint.every=0", "checkpoint.every must be >= 1"),
    ("data.samples_per_epoch=-5", "data.samples_per_epoch must be >= 0"),
    ("optimizer.lr=.nan", "optimizer.lr must be a finite number > 0"),
    ("optimizer.lr=.inf", "optimizer.lr must be a finite number > 0"),
    ("optimizer.betas=[0.9, 1.5]", "optimizer.betas needs two values in [0, 1)"),
    ("data.vl_per_batch=0", "data.vl_per_batch must be >= 1"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("train.ds_config=ds_configs/zero9.json", "train.ds_config: ds_configs/zero9.json not found"),
])
def test_every_config_error_is_found_at_load_naming_the_key(override, message, capsys):
    from vlbert_ds.cli.pretrain import main

    assert main(["--print-config", "data.prepare_default=d", "data.samples_per_epoch=64", override]) == 2
    assert message in capsys.readouterr().err


def test_a_broken_config_or_ds_config_file_is_named_with_its_line(tmp_path, capsys):
    from vlbert_ds.cli.pretrain import main

    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("data:\n  prepare_default: d\n  mode: [exact\ntrain: {steps: 3}\n")
    assert main(["--config", str(bad_yaml), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"config file {bad_yaml}: line 4" in err and "Traceback" not in err
    bad_toml = tmp_path / "run.toml"
    bad_toml.write_text("[data]\nprepare_default = d\n")
    assert main(["--config", str(bad_toml), "--print-config"]) == 2
    assert f"config file {bad_toml}" in capsys.readouterr().err
    bad_json = tmp_path / "zero.json"
    bad_json.write_text('{"zero_optimization": {"stage": 2,}}\n')
    assert main(["--print-config", "data.prepare_default=d", "data.samples_per_epoch=8",
                 f"train.ds_config={bad_json}"]) == 2
    assert f"train.ds_config: {bad_json}: not valid JSON (line 1, column 35" in capsys.readouterr().err


def test_a_damaged_sizes_json_is_named(tmp_path):
    from vlbert_ds.data import storage

    (tmp_path / "sizes.json").write_text('{"shard-000000.tar": 5,\n "shard-000001.tar": }')
    with pytest.raises(ValueError, match=r"sizes\.json: not valid JSON \(line 2, column 22"):
        storage.read_sizes([str(tmp_path / "shard-000000.tar")])


def test_a_torn_last_metrics_line_is_dropped_and_an_inner_one_is_named(tmp_path, caplog):
    from vlbert_ds.train.metrics import MetricsLogger
    from vlbert_ds.train.tracking import Tracker

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(rows) + '\n{"step": 4, "lo')  # what a kill in the middle of a write leaves
    logger = MetricsLogger(tmp_path, Tracker(enabled=False), True, 10, "t", 0)
    logger.start(3)
    logger.close()
    assert path.read_text().splitlines() == rows
    assert "dropping a torn last line" in caplog.text
    path.write_text(rows[0] + "\n{oops\n" + rows[2] + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a metrics row"):
        MetricsLogger(tmp_path, Tracker(enabled=False), True, 10, "t", 0).start(3)


def test_a_preset_with_a_bert_is_refused_instead_of_ignored(capsys):
    from vlbert_ds.cli.pretrain import main

    assert main(["--print-config", "data.prepare_default=d", "model.preset=base"]) == 2
    assert "model.preset='base' applies only with model.bert=''" in capsys.readouterr().err
    assert main(["--print-config", "data.prepare_default=d", "model.bert="]) == 2
    assert "set model.preset" in capsys.readouterr().err
    assert main(["--print-config", "data.prepare_default=d", "model.bert=", "model.preset=tiny"]) == 0


def test_a_resumed_optimizer_takes_the_new_learning_rate_and_schedule_at_its_step():
    import torch

    from vlbert_ds.train.config import OptimizerSection
    from vlbert_ds.train.engine import apply_optimizer_config

    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    groups = parameter_groups(model, 0.01, False)
    for group in groups:
        group["lr"] = 1e-3
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(2, 10, "linear"))
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    restored = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(groups, lr=1e-3), lr_lambda(2, 10, "linear"))
    restored.load_state_dict(scheduler.state_dict())  # what DeepSpeed's load_checkpoint does: the old base_lrs

    class Engine:
        lr_scheduler = restored

    apply_optimizer_config(Engine, OptimizerSection(lr=1e-4, warmup_steps=2, weight_decay=0.05, betas=[0.8, 0.9]), 20)
    expected = 1e-4 * ((20 - 4) / (20 - 2))  # linear decay over the new 20 steps, at step 4
    assert [g["lr"] for g in restored.optimizer.param_groups] == [expected] * len(groups)
    assert restored.get_last_lr() == [expected] * len(groups)
    decays = {g["weight_decay"] for g in restored.optimizer.param_groups}
    assert decays == {0.0, 0.05} and {g["betas"] for g in restored.optimizer.param_groups} == {(0.8, 0.9)}
    restored.optimizer.step()
    restored.step()  # the next step follows the new schedule
    assert restored.get_last_lr()[0] == 1e-4 * ((20 - 5) / (20 - 2))


def test_on_and_off_stay_choices_although_yaml_reads_them_as_booleans(tmp_path):
    assert load_config(None, ["data.prepare_default=d", "train.watchdog=on"]).train.watchdog == "on"
    (tmp_path / "run.yaml").write_text("data: {prepare_default: d}\ntrain: {watchdog: off}\n")
    assert load_config(tmp_path / "run.yaml").train.watchdog == "off"
