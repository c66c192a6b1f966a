"""End-to-end Fast R-CNN front end: what trains, what is frozen, and masked pixels never leak."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_vl_batch
from torchvision.ops import FrozenBatchNorm2d

from vlbert_ds.model import VLBertConfig, VLBertForPretraining, VLBertModel


def _config(**overrides) -> VLBertConfig:
    # Visual LayerNorm gain 1 (instead of the reference's 0) so that vision reaches the outputs at once.
    return VLBertConfig.preset("tiny", visual_front_end="end_to_end", visual_ln_gain_init=1.0, **overrides)


def _with_targets(batch, config):
    labels = torch.full_like(batch.input_ids, -1)
    labels[:, 1] = batch.input_ids[:, 1]
    batch.mlm_labels = labels
    batch.mrc_select = torch.zeros_like(batch.region_mask)
    batch.mrc_select[0, 1] = batch.mrc_select[1, 2] = True
    batch.region_masked = batch.mrc_select.clone()
    targets = torch.softmax(torch.randn(2, config.num_region_classes), -1)
    batch.mrc_targets = targets
    return batch


def test_gradients_reach_res3_to_res5_and_fusion_but_not_frozen_parts():
    torch.manual_seed(0)
    config = _config()
    model = VLBertForPretraining(config).train()
    batch = _with_targets(make_vl_batch(config, rows_vl=2, rows_text=1), config)
    front = model.vlbert.appearance
    buffers_before = {k: v.clone() for k, v in front.named_buffers()}
    model(batch).loss.backward()

    for name in ("res3", "res4", "res5"):
        grads = [p.grad for p in getattr(front, name).parameters()]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum().item() for g in grads) > 0, name
    assert model.vlbert.region_fusion.linear.weight.grad.abs().sum() > 0
    for name in ("stem", "res2"):
        for p in getattr(front, name).parameters():
            assert not p.requires_grad and p.grad is None, name
    # Every BatchNorm is frozen: no trainable parameters, statistics unchanged by a training pass.
    norms = [m for m in front.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert all(len(list(m.parameters())) == 0 for m in norms)
    for key, value in front.named_buffers():
        assert torch.equal(value, buffers_before[key]), key


def test_res5_is_dilated_and_keeps_the_14x14_grid():
    front = VLBertModel(_config(backbone="resnet50")).appearance
    assert front.feature_dim == 2048
    for block in front.res5:
        assert block.conv2.dilation == (2, 2) and block.conv2.stride == (1, 1)
    assert front.res5[0].downsample[0].stride == (1, 1)
    # Caffe-style: the stride of res3/res4 sits in the first 1x1 conv
    assert front.res3[0].conv1.stride == (2, 2) and front.res3[0].conv2.stride == (1, 1)
    pooled = torch.randn(3, 1024, 14, 14)
    assert front.res5(pooled).shape == (3, 2048, 14, 14)


def test_pixels_inside_a_masked_box_never_change_any_output():
    torch.manual_seed(0)
    config = _config()
    model = VLBertModel(config).eval()
    batch = make_vl_batch(config, rows_vl=1, rows_text=0, regions=3)
    batch.boxes[0] = torch.tensor([[0.0, 0.0, 127.0, 95.0], [4.0, 4.0, 40.0, 40.0], [60.0, 30.0, 100.0, 80.0]])
    batch.region_masked = torch.tensor([[False, False, True]])
    with torch.no_grad():
        base = model(batch)
        inside = batch.images.clone()
        inside[:, :, 30:81, 60:101] = torch.randn(1, 3, 51, 41) * 5  # all of box 2
        same = model(make_copy(batch, images=inside))
        outside = batch.images.clone()
        outside[:, :, 10:20, 10:20] += 3.0  # inside box 1, far from box 2
        other = model(make_copy(batch, images=outside))
    assert torch.equal(base.sequence_output, same.sequence_output)
    assert not torch.allclose(base.sequence_output, other.sequence_output)


def make_copy(batch, **changes):
    from dataclasses import replace

    return replace(batch, **changes)


def test_backbone_weights_load_from_a_local_torchvision_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    front = VLBertModel(_config(backbone_weights=str(path))).appearance
    assert torch.equal(front.res4[1].conv2.weight, source.layer3[1].conv2.weight)
    assert torch.equal(front.res5[0].conv1.weight, source.layer4[0].conv1.weight)  # res5 from layer4
    assert torch.equal(front.stem[1].running_mean, source.bn1.running_mean)


def _cast_like_deepspeed(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """What DeepSpeed's bf16/fp16 engine does to a module: parameters cast, buffers left in fp32."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def _uint8_batch(config, seed: int = 0):
    batch = _with_targets(make_vl_batch(config, rows_vl=2, rows_text=1, seed=seed), config)
    gen = torch.Generator().manual_seed(seed)
    batch.images = torch.randint(0, 256, batch.images.shape, dtype=torch.uint8, generator=gen)  # as the loader ships
    return batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_end_to_end_trains_in_each_precision_as_the_engine_casts_it(dtype):
    """Forward and backward at DeepSpeed's cast (fp32 BatchNorm buffers, low-precision weights)."""
    if dtype == torch.float16 and not torch.cuda.is_available():
        pytest.skip("fp16 needs a GPU: DeepSpeed refuses it on CPU (and CPU fp16 convolutions take minutes)")
    torch.manual_seed(0)
    config = _config()
    reference = VLBertForPretraining(config).train()
    model = _cast_like_deepspeed(copy.deepcopy(reference), dtype)
    batch = _uint8_batch(config)
    out = model(batch)
    assert torch.isfinite(out.loss), out.losses
    out.loss.backward()
    res4 = [p.grad for p in model.vlbert.appearance.res4.parameters()]
    assert all(g is not None and g.dtype == dtype for g in res4)
    assert sum(float(g.float().abs().sum()) for g in res4) > 0
    # The low-precision loss is the fp32 loss up to rounding (dropout is seeded identically).
    torch.manual_seed(1)
    ref_loss = float(reference(batch).loss.detach())
    torch.manual_seed(1)
    low_loss = float(model(batch).loss.detach())
    assert abs(low_loss - ref_loss) <= (1e-5 if dtype == torch.float32 else 0.1) * max(1.0, abs(ref_loss))
