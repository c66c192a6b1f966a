"""Visual front ends: per-RoI appearance features, then fusion with box geometry.

Two front ends share one interface, `appearance(batch) -> [B, R, D]`:

* `PrecomputedAppearance`: features come in the batch (bottom-up-attention `pool5_flat`); a masked
  RoI's feature is replaced by a learned vector initialised to 0 (`object_mask_visual_embedding`).
* `FastRCNNAppearance`: the official `common/fast_rcnn.py` head, built from torchvision pieces on
  `ResNetC4` (the body the region detector shares) — ResNet through res4 (stride 16),
  `torchvision.ops.roi_align` 14x14 at 1/16 with sampling ratio 1 (or Caffe's ROIPool, `roi_pooler`),
  a dilated res5 (stride 1, dilation 2 in every block, as the official `_make_layer(..., dilation=2)`),
  average pooling. Stem and res2 are frozen; every BatchNorm is torchvision's `FrozenBatchNorm2d`
  (statistics and affine fixed, i.e. "frozen and in eval mode"). Pixels of masked RoIs are zeroed in
  the normalised image before the CNN (`MASK_RAW_PIXELS: true`), so nothing of a masked box leaks
  through RoI 0 or overlapping boxes.

`RegionFusion` is the official `obj_downsample`: ReLU(Linear(Dropout([geometry ⧺ appearance]))),
geometry first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d, roi_align, roi_pool

from vlbert_ds.model.config import RoIPooler, StemPool, VLBertConfig
from vlbert_ds.model.geometry import box_geometry_embedding

log = logging.getLogger(__name__)


class PrecomputedAppearance(nn.Module):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.feature_dim = config.precomputed_feature_dim
        # Official name and init: `object_mask_visual_embedding`, zeros.
        self.masked_region_feature = nn.Parameter(torch.zeros(self.feature_dim))

    def forward(self, region_features: Tensor, region_masked: Tensor | None) -> Tensor:
        features = region_features.to(self.masked_region_feature.dtype)
        if region_masked is not None:
            features = torch.where(region_masked[..., None], self.masked_region_feature, features)
        return features


class FrozenBatchNorm(FrozenBatchNorm2d):
    """torchvision's `FrozenBatchNorm2d` whose output keeps the input's dtype.

    Mixed-precision engines (DeepSpeed bf16/fp16) cast parameters but keep buffers in fp32, and the
    frozen statistics are buffers: torchvision's version would then promote every activation after the
    first BatchNorm to fp32 and the next low-precision convolution would refuse it. The scale and shift
    are folded in fp32 (as precise as the statistics) and applied in the activation's dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)


def calibrate_frozen_batchnorm(module: nn.Module, forward, seed: int = 0) -> None:
    """Give every frozen BatchNorm of `module` the statistics of its input during `forward()` (and a
    random affine), so that a randomly initialised network has activations of order 1.

    For benchmarks and tests with random weights: without it a deep ResNet's activations grow by
    orders of magnitude (frozen BN is the identity at init) and every RPN box degenerates.
    """
    generator = torch.Generator().manual_seed(seed)

    def hook(norm: FrozenBatchNorm, args) -> None:
        x = args[0].float()
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
        norm.bias.copy_(torch.rand(norm.bias.shape, generator=generator) * 0.4 - 0.2)

    handles = [m.register_forward_pre_hook(hook) for m in module.modules() if isinstance(m, FrozenBatchNorm)]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()


def _build_resnet(backbone: str, stride_in_1x1: bool, stem_pool: StemPool) -> nn.Module:
    """A torchvision ResNet with frozen BN, Caffe-style stride placement and a dilated res5.

    `stem_pool="caffe"`: the stem's max pool as Caffe's (kernel 3, stride 2, no padding, rounding up),
    which the bottom-up-attention weights were trained with; torchvision's pads by 1 instead.
    """
    net = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm)
    if stem_pool == "caffe":
        net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    for layer in (net.layer2, net.layer3):
        first = layer[0]
        if stride_in_1x1 and isinstance(first, Bottleneck):
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    res5 = net.layer4
    res5[0].downsample[0].stride = (1, 1)
    for block in res5:
        if isinstance(block, Bottleneck):
            block.conv2.stride, block.conv2.dilation, block.conv2.padding = (1, 1), (2, 2), (2, 2)
        else:  # BasicBlock: the official code dilates conv1 only
            assert isinstance(block, BasicBlock)
            block.conv1.stride, block.conv1.dilation, block.conv1.padding = (1, 1), (2, 2), (2, 2)
    return net


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors, torch or numpy-pickle state dict, never running code in it."""
    from vlbert_ds.model.weight_files import read_weight_file

    return read_weight_file(path)


class ResNetC4(nn.Module):
    """The ResNet "C4" body shared by the end-to-end front end and the region detector.

    One code path from pixels to a per-box feature: `feature_map` (stem, res2..res4: stride 16),
    `box_features` (RoI pooling at 1/16, the dilated res5, mean over the pooled grid). The same
    weights therefore give the same features in extraction (`model/detector.py`) and in end-to-end
    training. Stage names as in the official `expose_stages`: stem (1), res2..res4 (2..4), res5.
    """

    def __init__(self, backbone: str = "resnet101", stride_in_1x1: bool = True, stem_pool: StemPool = "torchvision",
                 roi_pooler: RoIPooler = "align", output_size: int = 14, sampling_ratio: int = 1) -> None:
        super().__init__()
        if roi_pooler not in ("align", "pool"):
            raise ValueError(f"roi_pooler must be 'align' or 'pool', got {roi_pooler!r}")
        net = _build_resnet(backbone, stride_in_1x1, stem_pool)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.res2, self.res3, self.res4 = net.layer1, net.layer2, net.layer3
        self.res5 = net.layer4
        self.feature_dim = 512 * (4 if isinstance(self.res5[0], Bottleneck) else 1)
        self.map_channels = self.feature_dim // 2
        self.roi_pooler = roi_pooler
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def feature_map(self, images: Tensor) -> Tensor:
        """Caffe-normalised BGR images [N,3,H,W] -> the res4 map [N,C,ceil(H/16),ceil(W/16)]."""
        return self.res4(self.res3(self.res2(self.stem(images))))

    def box_features(self, feature_map: Tensor, rois: Tensor) -> Tensor:
        """rois [K,5] (image index, x1, y1, x2, y2 in input pixels) -> [K, feature_dim]."""
        # torchvision's CPU kernels have no bf16 version: pool in fp32 there, back to bf16 after.
        pool_dtype = torch.float32 if feature_map.device.type == "cpu" and feature_map.dtype == torch.bfloat16 \
            else feature_map.dtype
        fmap, rois = feature_map.to(pool_dtype), rois.to(pool_dtype)
        if self.roi_pooler == "align":
            pooled = roi_align(fmap, rois, output_size=self.output_size, spatial_scale=1.0 / 16,
                               sampling_ratio=self.sampling_ratio, aligned=False)
        else:  # Caffe's ROIPooling, as bottom-up-attention's `roi_pool5`
            pooled = roi_pool(fmap, rois, output_size=self.output_size, spatial_scale=1.0 / 16)
        return self.res5(pooled.to(feature_map.dtype)).mean(dim=(2, 3))  # AvgPool2d(14) + flatten


class FastRCNNAppearance(ResNetC4):
    def __init__(self, config: VLBertConfig) -> None:
        super().__init__(config.backbone, config.backbone_stride_in_1x1, config.backbone_stem_pool,
                         config.roi_pooler, config.roi_align_output_size, config.roi_align_sampling_ratio)
        self.frozen_stages = config.frozen_backbone_stages
        self.register_buffer("pixel_mean_bgr", torch.tensor(config.pixel_mean_bgr).view(1, 3, 1, 1),
                             persistent=False)
        if config.backbone_weights:
            self.load_backbone_weights(config.backbone_weights)
        self._freeze()

    def _freeze(self) -> None:
        stages = {1: self.stem, 2: self.res2, 3: self.res3, 4: self.res4}
        for stage in self.frozen_stages:
            for p in stages[stage].parameters():
                p.requires_grad_(False)

    def load_backbone_weights(self, path: str | Path) -> None:
        """Load ResNet weights from a local file: torchvision names (`conv1`, `bn1`, `layer1..4`), or ours
        (`stem`, `res2..res5`, also under `body.` as a `vlbert-prep train-detector --arch bua-*` or
        converted bottom-up-attention detector file holds them).

        `layer4` initialises the dilated res5 head, as the official `init_weight` does.
        """
        state = load_state_dict_file(path)
        rename = {"conv1.": "stem.0.", "bn1.": "stem.1.", "layer1.": "res2.", "layer2.": "res3.",
                  "layer3.": "res4.", "layer4.": "res5."}
        ours = ("stem.", "res2.", "res3.", "res4.", "res5.")
        mapped: dict[str, Tensor] = {}
        for key, value in state.items():
            key = key.removeprefix("module.").removeprefix("backbone.").removeprefix("body.")
            if key.startswith(ours):
                mapped[key] = value
                continue
            for old, new in rename.items():
                if key.startswith(old):
                    mapped[new + key[len(old):]] = value
                    break
        result = self.load_state_dict(mapped, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"backbone_weights {path}: {len(missing)} parameters missing, e.g. {missing[:5]}")
        log.info("loaded backbone weights from %s (%d tensors)", path, len(mapped))

    @staticmethod
    def mask_pixels(images: Tensor, boxes: Tensor, hide: Tensor) -> Tensor:
        """Zero the pixels of hidden boxes: images [N,3,H,W], boxes [N,R,4], hide [N,R] bool.

        A pixel (x, y) is hidden when floor(x1) <= x <= ceil(x2) and floor(y1) <= y <= ceil(y2) for
        some hidden box. Done as one batched matmul of per-box row and column indicators instead of a
        Python loop over boxes.
        """
        if not bool(hide.any()):
            return images
        height, width = images.shape[-2:]
        ys = torch.arange(height, device=images.device, dtype=boxes.dtype)
        xs = torch.arange(width, device=images.device, dtype=boxes.dtype)
        x1, y1, x2, y2 = (boxes[..., i : i + 1] for i in range(4))
        rows = ((ys >= y1.floor()) & (ys <= y2.ceil()) & hide[..., None]).to(images.dtype)  # [N,R,H]
        cols = ((xs >= x1.floor()) & (xs <= x2.ceil())).to(images.dtype)  # [N,R,W]
        covered = torch.bmm(rows.transpose(1, 2), cols) > 0  # [N,H,W]
        return images.masked_fill(covered[:, None], 0.0)

    def normalise(self, images: Tensor, image_size: Tensor) -> Tensor:
        """uint8 RGB [N,3,H,W] -> Caffe-normalised BGR float; padding beyond each image's size set to 0.

        Shipping uint8 and normalising here moves 4x fewer bytes from the loader to the device.
        """
        dtype = self.stem[0].weight.dtype  # the first layer's: engines may cast weights but not buffers
        images = images.flip(1).to(dtype) - self.pixel_mean_bgr.to(dtype)
        height, width = images.shape[-2:]
        inside_y = torch.arange(height, device=images.device)[None, :] < image_size[:, 1:2]
        inside_x = torch.arange(width, device=images.device)[None, :] < image_size[:, 0:1]
        inside = inside_y[:, :, None] & inside_x[:, None, :]
        return images.masked_fill(~inside[:, None], 0.0)

    def forward(self, images: Tensor, boxes: Tensor, region_mask: Tensor, region_masked: Tensor | None,
                image_size: Tensor | None = None) -> Tensor:
        """images [N,3,H,W] for the N rows that have an image; boxes/region_mask [N,R,...] -> [N,R,D]."""
        if images.dtype == torch.uint8:
            if image_size is None:
                raise ValueError("uint8 images need image_size to normalise and mask the padding")
            images = self.normalise(images, image_size)
        if region_masked is not None:
            images = self.mask_pixels(images, boxes.to(images.dtype), region_masked & region_mask)
        feature_map = self.feature_map(images)
        image_index, region_index = region_mask.nonzero(as_tuple=True)
        rois = torch.cat((image_index[:, None].to(feature_map.dtype),
                          boxes[image_index, region_index].to(feature_map.dtype)), dim=1)
        per_roi = self.box_features(feature_map, rois)
        out = per_roi.new_zeros(*region_mask.shape, per_roi.shape[-1])
        out[image_index, region_index] = per_roi
        return out


class RegionFusion(nn.Module):
    """`obj_downsample`: v = ReLU(Linear_{geom+app -> H}(Dropout([geometry ⧺ appearance])))."""

    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.wave_dim = config.geometry_wave_dim
        self.wave_base = config.geometry_wave_base
        self.dropout = nn.Dropout(config.visual_fusion_dropout)
        self.linear = nn.Linear(config.geometry_dim + config.appearance_dim, config.hidden_size)
        self.activation = nn.ReLU()

    def forward(self, appearance: Tensor, boxes: Tensor, image_size: Tensor) -> Tensor:
        geometry = box_geometry_embedding(boxes, image_size, self.wave_dim, self.wave_base)
        fused = torch.cat((geometry.to(appearance.dtype), appearance), dim=-1)
        return self.activation(self.linear(self.dropout(fused)))

