"""Region detectors for VL-BERT: boxes, per-box appearance features and class distributions from images.

VL-BERT needs, per image, 10-100 detected boxes with an appearance feature each and the detector's
class distribution (the soft target of masked RoI classification). This module is library code
(torch + torchvision only) shared by `vlbert-prep regions`:

* `select_regions`: the box rule of bottom-up-attention's `tools/generate_tsv.py`, exactly: for
  every foreground class, NMS (IoU 0.3) over the proposals by that class's score; each proposal's
  confidence is its best class score among the classes whose NMS kept it; proposals with
  confidence >= 0.5 are kept, at least 10 and at most 100 (by confidence). The boxes kept are the
  proposals themselves (not the class-regressed boxes), as in the official script.
* `TorchvisionRegionDetector`: any torchvision two-stage detection model (`fasterrcnn_resnet50_fpn_v2`,
  `fasterrcnn_mobilenet_v3_large_fpn`, ...) with weights from a local file. Features are its box
  head's output per proposal (e.g. 1024-d `TwoMLPHead`), soft labels its box predictor's softmax over
  its own classes (91 for COCO, index 0 = background). Train VL-BERT on these with
  `model.precomputed_feature_dim` and `model.num_region_classes` set to those sizes.

* `BottomUpAttentionDetector`: the bottom-up-attention Faster R-CNN (Anderson et al. 2018, the
  Caffe model of peteanderson80/bottom-up-attention) in torch + torchvision: the `ResNetC4` body
  that the end-to-end front end uses (Caffe stem, stride-16 res4, ROIPool 14x14, dilated res5, mean
  pool: the 2048-d `pool5_flat`), torchvision's `RegionProposalNetwork` with the Caffe model's
  anchors (`caffe_anchors`: scales 4, 8, 16, 32 x ratios 0.5, 1, 2 of a 16-pixel cell) and its box
  arithmetic (widths count the end pixel: `+ 1`), a 512-channel RPN conv, a C-way classifier with
  per-class box regression and, when the weights have it, the 401-way attribute head. Weights: ours
  (`.safetensors` with the architecture in its metadata, as `vlbert-prep train-detector` writes)
  or the two public PyTorch ports of the Caffe weights (`load_detector_weights`, name maps below).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import nms

from vlbert_ds.model.config import Backbone, RoIPooler, StemPool
from vlbert_ds.model.visual import ResNetC4

NMS_IOU, CONF_THRESHOLD, MIN_BOXES, MAX_BOXES = 0.3, 0.5, 10, 100


@dataclass
class ImageRegions:
    """One image's regions, in pixels of the image as given."""

    boxes: Tensor  # [K, 4] float32 x1, y1, x2, y2
    features: Tensor  # [K, D] float32
    scores: Tensor  # [K, C] float32 class distribution (index 0 = background)
    confidence: Tensor  # [K] the selection confidence, descending
    attributes: Tensor | None = None  # [K, A] attribute distribution (index 0 = no attribute), if the head exists


def caffe_nms(boxes: Tensor, scores: Tensor, iou: float) -> Tensor:
    """NMS with Caffe's box arithmetic (a box covers x1..x2 inclusive: width x2 - x1 + 1).

    Shifting every x2, y2 by one pixel makes torchvision's IoU exactly Caffe's.
    """
    shifted = boxes.float().clone()
    shifted[:, 2:] += 1.0
    return nms(shifted, scores.float(), iou)


def select_regions(boxes: Tensor, scores: Tensor, nms_iou: float = NMS_IOU, threshold: float = CONF_THRESHOLD,
                   min_boxes: int = MIN_BOXES, max_boxes: int = MAX_BOXES) -> tuple[Tensor, Tensor]:
    """Indices of the proposals to keep (by descending confidence) and their confidences.

    boxes [N, 4], scores [N, C] with class 0 the background (never a detection class).
    """
    count = boxes.shape[0]
    max_conf = torch.zeros(count, dtype=torch.float32, device=boxes.device)
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), max_conf
    boxes, scores = boxes.float(), scores.float()
    for cls in range(1, scores.shape[1]):
        class_scores = scores[:, cls]
        keep = caffe_nms(boxes, class_scores, nms_iou)
        max_conf[keep] = torch.maximum(max_conf[keep], class_scores[keep])
    order = torch.argsort(max_conf, descending=True, stable=True)
    passing = int((max_conf >= threshold).sum())
    kept = order[: min(max(passing, min_boxes), max_boxes, count)]
    return kept, max_conf[kept]


def load_exactly(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load `state` into `module` when every name and shape fits; else say what does not (`what: ...`)."""
    ours = module.state_dict()
    missing = sorted(k for k in ours if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in ours)
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{what}: {len(missing)} missing (e.g. {missing[:4]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:4]}), {len(mismatched)} of another shape (e.g. {mismatched[:3]})")
    module.load_state_dict(state, strict=False)


def _torchvision_builder(arch: str):
    builder = getattr(torchvision.models.detection, arch, None)
    if builder is None or not callable(builder) or arch.startswith("_"):
        known = sorted(n for n in dir(torchvision.models.detection) if n.startswith(("fasterrcnn", "maskrcnn")))
        raise ValueError(f"unknown torchvision detection model {arch!r}; two-stage models with a box head: "
                         f"{', '.join(known)}")
    return builder


class TorchvisionRegionDetector(nn.Module):
    """A torchvision Faster/Mask R-CNN as a region extractor (see the module docstring)."""

    def __init__(self, arch: str, weights: str | None = None, num_classes: int | None = None, min_size: int = 600,
                 max_size: int = 1000, proposals: int = 300) -> None:
        super().__init__()
        from vlbert_ds.model.weight_files import read_weight_file

        state = read_weight_file(weights) if weights else None
        if num_classes is None:
            num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]) \
                if state is not None and "roi_heads.box_predictor.cls_score.weight" in state else 91
        self.net = _torchvision_builder(arch)(weights=None, weights_backbone=None, num_classes=num_classes,
                                              min_size=min_size, max_size=max_size,
                                              rpn_pre_nms_top_n_test=max(1000, proposals),
                                              rpn_post_nms_top_n_test=proposals, box_detections_per_img=proposals)
        if not hasattr(self.net, "roi_heads") or not hasattr(self.net.roi_heads, "box_head"):
            raise ValueError(f"{arch} has no box head to take region features from (use a Faster/Mask R-CNN)")
        if state is not None:
            load_exactly(self.net, state, f"{weights} does not fit torchvision's {arch} with {num_classes} classes")
        self.num_classes = num_classes
        self.eval()

    @property
    def feature_dim(self) -> int:
        return int(self.net.roi_heads.box_predictor.cls_score.in_features)

    @torch.inference_mode()
    def forward(self, images: list[Tensor], **selection) -> list[ImageRegions]:
        """images: uint8 or float (0-1) RGB [3, H, W] tensors -> the selected regions of each, in its pixels."""
        net = self.net
        originals = [tuple(img.shape[-2:]) for img in images]
        images = [img.float() / 255.0 if img.dtype == torch.uint8 else img.float() for img in images]
        batch, _ = net.transform(images)
        features = net.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = {"0": features}
        proposals, _ = net.rpn(batch, features)
        heads = net.roi_heads
        representation = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        logits, _ = heads.box_predictor(representation)
        probabilities = torch.softmax(logits.float(), dim=-1)
        out, start = [], 0
        for boxes, size, original in zip(proposals, batch.image_sizes, originals, strict=True):
            end = start + boxes.shape[0]
            scores, feats = probabilities[start:end], representation[start:end].float()
            start = end
            keep, confidence = select_regions(boxes, scores, **selection)
            ratio = torch.tensor([original[1] / size[1], original[0] / size[0]] * 2, device=boxes.device)
            scaled = boxes[keep].float() * ratio
            scaled[:, 0::2] = scaled[:, 0::2].clamp(0, original[1] - 1)
            scaled[:, 1::2] = scaled[:, 1::2].clamp(0, original[0] - 1)
            out.append(ImageRegions(scaled, feats[keep], scores[keep], confidence))
        return out


# ---------------------------------------------------------------------------------------------------
# The bottom-up-attention Faster R-CNN
# ---------------------------------------------------------------------------------------------------

BUA_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3),
              "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}


@dataclass(frozen=True)
class BUASpec:
    """The architecture of a bottom-up-attention detector (defaults: the released Visual Genome model)."""

    backbone: Backbone = "resnet101"
    num_classes: int = 1601  # index 0 = background
    num_attributes: int = 401  # index 0 = no attribute; 0 = no attribute head
    rpn_channels: int = 512
    anchor_scales: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    stem_pool: StemPool = "caffe"
    stride_in_1x1: bool = True
    roi_pooler: RoIPooler = "pool"
    roi_output_size: int = 14
    min_size: int = 600  # input short side
    max_size: int = 1000  # input long side at most
    rpn_pre_nms: int = 6000
    rpn_post_nms: int = 300
    rpn_nms_iou: float = 0.7
    rpn_min_box: float = 16.0  # in original-image pixels (Caffe's RPN_MIN_SIZE, times the input scale)
    pixel_mean_bgr: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)
    # Training only: anchors / RoIs sampled per image, and the RPN's proposals kept for the box head.
    rpn_batch_per_image: int = 256
    roi_batch_per_image: int = 64
    rpn_train_pre_nms: int = 12000
    rpn_train_post_nms: int = 2000

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchor_scales", tuple(float(v) for v in self.anchor_scales))
        object.__setattr__(self, "anchor_ratios", tuple(float(v) for v in self.anchor_ratios))
        object.__setattr__(self, "pixel_mean_bgr", tuple(float(v) for v in self.pixel_mean_bgr))
        if self.backbone not in BUA_BLOCKS:
            raise ValueError(f"BUASpec.backbone must be one of {sorted(BUA_BLOCKS)}, got {self.backbone!r}")
        if self.num_classes < 2:
            raise ValueError("BUASpec.num_classes counts the background too: >= 2")

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_ratios)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BUASpec:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})


def caffe_anchors(ratios: tuple[float, ...], scales: tuple[float, ...], base_size: int = 16) -> Tensor:
    """py-faster-rcnn's `generate_anchors`: a (0, 0, 15, 15) cell, for each ratio (h / w) a window of the
    same area with rounded sides, then each scaled; ratio-major order. [A, 4] float32."""
    size = float(base_size * base_size)
    center = (base_size - 1) / 2.0
    anchors = []
    for ratio in ratios:
        ws = np.round(np.sqrt(size / ratio))
        hs = np.round(ws * ratio)
        for scale in scales:
            w, h = ws * scale, hs * scale
            anchors.append([center - 0.5 * (w - 1), center - 0.5 * (h - 1), center + 0.5 * (w - 1),
                            center + 0.5 * (h - 1)])
    return torch.tensor(anchors, dtype=torch.float32)


class CaffeAnchorGenerator(nn.Module):
    """The Caffe anchors at every cell of a stride-16 map (torchvision's generator derives the stride from
    the image and map sizes, which Caffe's rounded-up pooling makes 15 for a 600-pixel side)."""

    def __init__(self, ratios: tuple[float, ...], scales: tuple[float, ...], stride: int = 16) -> None:
        super().__init__()
        self.stride = stride
        self.register_buffer("cell_anchors", caffe_anchors(ratios, scales, stride), persistent=False)

    def num_anchors_per_location(self) -> list[int]:
        return [int(self.cell_anchors.shape[0])]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        height, width = feature_maps[0].shape[-2:]
        device = feature_maps[0].device
        ys = torch.arange(height, device=device, dtype=torch.float32) * self.stride
        xs = torch.arange(width, device=device, dtype=torch.float32) * self.stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)
        anchors = (shifts + self.cell_anchors.to(device)[None]).reshape(-1, 4)
        return [anchors for _ in range(image_list.tensors.shape[0])]


class CaffeBoxCoder(det_utils.BoxCoder):
    """torchvision's box coder with Caffe's pixel arithmetic (width = x2 - x1 + 1), as the weights learnt."""

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        ex_w = proposals[:, 2] - proposals[:, 0] + 1.0
        ex_h = proposals[:, 3] - proposals[:, 1] + 1.0
        ex_x, ex_y = proposals[:, 0] + 0.5 * ex_w, proposals[:, 1] + 0.5 * ex_h
        gt_w = reference_boxes[:, 2] - reference_boxes[:, 0] + 1.0
        gt_h = reference_boxes[:, 3] - reference_boxes[:, 1] + 1.0
        gt_x, gt_y = reference_boxes[:, 0] + 0.5 * gt_w, reference_boxes[:, 1] + 0.5 * gt_h
        return torch.stack((wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h, ww * torch.log(gt_w / ex_w),
                            wh * torch.log(gt_h / ex_h)), dim=1)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        # In fp32 whatever the network ran in: bf16 would place a 1000-pixel coordinate 4 pixels off.
        rel_codes, boxes = rel_codes.float(), boxes.float()
        widths = boxes[:, 2] - boxes[:, 0] + 1.0
        heights = boxes[:, 3] - boxes[:, 1] + 1.0
        ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)
        x = dx * widths[:, None] + ctr_x[:, None]
        y = dy * heights[:, None] + ctr_y[:, None]
        w, h = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
        return torch.stack((x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h), dim=2).flatten(1)


class CaffeRPN(RegionProposalNetwork):
    """torchvision's RPN (anchor matching, sampling and losses kept) with Caffe's proposal layer:
    clip to the image (last pixel w - 1), drop boxes under 16 original pixels a side, best
    `pre_nms` by objectness, NMS 0.7 with Caffe arithmetic, best `post_nms`."""

    def __init__(self, spec: BUASpec, in_channels: int) -> None:
        super().__init__(CaffeAnchorGenerator(spec.anchor_ratios, spec.anchor_scales),
                         BUARPNHead(in_channels, spec.rpn_channels, spec.num_anchors),
                         fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=spec.rpn_batch_per_image,
                         positive_fraction=0.5,
                         pre_nms_top_n={"training": spec.rpn_train_pre_nms, "testing": spec.rpn_pre_nms},
                         post_nms_top_n={"training": spec.rpn_train_post_nms, "testing": spec.rpn_post_nms},
                         nms_thresh=spec.rpn_nms_iou)
        self.box_coder = CaffeBoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.caffe_min_box = spec.rpn_min_box
        self.image_scales: list[float] = []  # set by the detector for each call

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        scores_all = torch.sigmoid(objectness.detach().reshape(proposals.shape[0], -1))
        kept_boxes, kept_scores = [], []
        for boxes, scores, (height, width), scale in zip(proposals.detach(), scores_all, image_shapes,
                                                          self.image_scales, strict=True):
            boxes = torch.stack((boxes[:, 0].clamp(0, width - 1), boxes[:, 1].clamp(0, height - 1),
                                 boxes[:, 2].clamp(0, width - 1), boxes[:, 3].clamp(0, height - 1)), dim=1)
            side = self.caffe_min_box * scale
            big = ((boxes[:, 2] - boxes[:, 0] + 1) >= side) & ((boxes[:, 3] - boxes[:, 1] + 1) >= side)
            boxes, scores = boxes[big], scores[big]
            order = torch.argsort(scores, descending=True)[: self.pre_nms_top_n()]
            boxes, scores = boxes[order], scores[order]
            keep = caffe_nms(boxes, scores, self.nms_thresh)[: self.post_nms_top_n()]
            kept_boxes.append(boxes[keep])
            kept_scores.append(scores[keep])
        return kept_boxes, kept_scores


class BUARPNHead(nn.Module):
    """3x3 conv to `hidden` channels, ReLU, then one objectness logit and 4 deltas per anchor.

    Caffe's RPN scores each anchor with a 2-way softmax (background, object); softmax([b, f])[1] is
    sigmoid(f - b), so the ports' 2A-channel layer is folded into this A-channel one on loading.
    """

    def __init__(self, in_channels: int, hidden: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1)
        self.objectness = nn.Conv2d(hidden, num_anchors, kernel_size=1)
        self.deltas = nn.Conv2d(hidden, num_anchors * 4, kernel_size=1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        hidden = [F.relu(self.conv(x)) for x in features]
        return [self.objectness(h) for h in hidden], [self.deltas(h) for h in hidden]


class AttributeHead(nn.Module):
    """Bottom-up-attention's attribute classifier: the box feature and an embedding of its most likely
    class -> 512 -> ReLU -> attribute softmax."""

    def __init__(self, num_classes: int, feature_dim: int, num_attributes: int) -> None:
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes, 256)
        self.hidden = nn.Linear(feature_dim + 256, 512)
        self.score = nn.Linear(512, num_attributes)

    def forward(self, features: Tensor, class_logits: Tensor) -> Tensor:
        joined = torch.cat((features, self.class_embedding(class_logits.argmax(dim=1))), dim=1)
        return torch.softmax(self.score(F.relu(self.hidden(joined))).float(), dim=-1)


class BottomUpAttentionDetector(nn.Module):
    """See the module docstring. `forward(images, targets)` trains (losses); `__call__` on images alone
    extracts regions; `features_for_boxes` describes given boxes."""

    def __init__(self, spec: BUASpec) -> None:
        super().__init__()
        self.spec = spec
        self.body = ResNetC4(spec.backbone, spec.stride_in_1x1, spec.stem_pool, spec.roi_pooler,
                             spec.roi_output_size, sampling_ratio=1)
        self.rpn = CaffeRPN(spec, self.body.map_channels)
        dim = self.body.feature_dim
        self.cls_score = nn.Linear(dim, spec.num_classes)
        self.bbox_pred = nn.Linear(dim, spec.num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.attribute_head = AttributeHead(spec.num_classes, dim, spec.num_attributes) \
            if spec.num_attributes > 0 else None
        # torchvision's RoI matcher and sampler for training the box head (it holds no weights).
        self.sampler = RoIHeads(nn.Identity(), nn.Identity(), nn.Identity(), fg_iou_thresh=0.5, bg_iou_thresh=0.5,
                                batch_size_per_image=spec.roi_batch_per_image, positive_fraction=0.25,
                                bbox_reg_weights=(1.0, 1.0, 1.0, 1.0), score_thresh=0.0, nms_thresh=0.3,
                                detections_per_img=100)
        self.sampler.box_coder = CaffeBoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.register_buffer("pixel_mean", torch.tensor(spec.pixel_mean_bgr).view(3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def feature_dim(self) -> int:
        return self.body.feature_dim

    def input_scale(self, height: int, width: int) -> float:
        """generate_tsv's `im_scale`: short side to min_size, unless the long side would pass max_size."""
        return min(self.spec.min_size / min(height, width), self.spec.max_size / max(height, width))

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]], list[float]]:
        """uint8 (0-255) or float (0-1) RGB [3,H,W] -> a zero-padded batch of resized, BGR, mean-subtracted
        images (Caffe's blob), their sizes and scales. Resizing is bilinear without antialiasing, as cv2's."""
        resized, sizes, scales = [], [], []
        for image in images:
            pixels = image.float() if image.dtype == torch.uint8 else image.float() * 255.0
            height, width = pixels.shape[-2:]
            scale = self.input_scale(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            if size != (height, width):
                pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0]
            resized.append(pixels.flip(0) - self.pixel_mean.to(pixels.device))
            sizes.append(size)
            scales.append(scale)
        batch = resized[0].new_zeros(len(resized), 3, max(s[0] for s in sizes), max(s[1] for s in sizes))
        for i, pixels in enumerate(resized):
            batch[i, :, : pixels.shape[1], : pixels.shape[2]] = pixels
        return batch.to(self.cls_score.weight.dtype), sizes, scales

    def _describe(self, feature_map: Tensor, boxes: list[Tensor]) -> Tensor:
        rois = torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), dim=1) for i, b in enumerate(boxes)])
        return self.body.box_features(feature_map, rois.to(feature_map.dtype))

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Training: images and targets (`boxes` in image pixels, `labels` 1..C-1) -> the four losses.
        Inference: images -> `extract(images)`."""
        if targets is None:
            return self.extract(images)
        batch, sizes, scales = self.preprocess(images)
        targets = [{"boxes": t["boxes"].float() * s, "labels": t["labels"].long()}
                   for t, s in zip(targets, scales, strict=True)]
        feature_map = self.body.feature_map(batch)
        self.rpn.image_scales = scales
        proposals, rpn_losses = self.rpn(ImageList(batch, sizes), {"0": feature_map}, targets)
        proposals, _, labels, regression_targets = self.sampler.select_training_samples(proposals, targets)
        features = self._describe(feature_map, proposals)
        loss_classifier, loss_box = fastrcnn_loss(self.cls_score(features), self.bbox_pred(features), labels,
                                                  regression_targets)
        return {**rpn_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box}

    @torch.inference_mode()
    def extract(self, images: list[Tensor], **selection) -> list[ImageRegions]:
        """The selected regions of each image (generate_tsv.py's rule), in its own pixels."""
        batch, sizes, scales = self.preprocess(images)
        feature_map = self.body.feature_map(batch)
        self.rpn.image_scales = scales
        proposals, _ = self.rpn(ImageList(batch, sizes), {"0": feature_map})
        features = self._describe(feature_map, proposals)
        logits = self.cls_score(features)
        probabilities = torch.softmax(logits.float(), dim=-1)
        attributes = self.attribute_head(features, logits) if self.attribute_head is not None else None
        out, start = [], 0
        for boxes, scale in zip(proposals, scales, strict=True):
            end = start + boxes.shape[0]
            original = boxes.float() / scale  # generate_tsv: cls_boxes = rois / im_scale
            keep, confidence = select_regions(original, probabilities[start:end], **selection)
            out.append(ImageRegions(original[keep], features[start:end][keep].float(),
                                    probabilities[start:end][keep], confidence,
                                    attributes[start:end][keep] if attributes is not None else None))
            start = end
        return out

    @torch.inference_mode()
    def features_for_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Features of given boxes (image pixels), as extraction computes them for its own."""
        batch, _, scales = self.preprocess(images)
        feature_map = self.body.feature_map(batch)
        features = self._describe(feature_map, [b.float() * s for b, s in zip(boxes, scales, strict=True)])
        return list(features.float().split([b.shape[0] for b in boxes]))


DETECTOR_METADATA_KEY = "vlbert_ds.bua_spec"


def save_detector(detector: BottomUpAttentionDetector, path: str | Path) -> None:
    """Our detector file: a safetensors state dict with the architecture in its metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()}
    save_file(state, str(path), metadata={DETECTOR_METADATA_KEY: detector.spec.to_json()})


# Names of the two public PyTorch ports of the Caffe weights (detectron2 layouts) -> ours.
_PORT_RESNET = [
    (r"^backbone\.stem\.conv1\.weight$", "body.stem.0.weight"),
    (r"^backbone\.stem\.conv1\.norm\.(.+)$", r"body.stem.1.\1"),
    (r"^(?:backbone|roi_heads)\.(res[2-5])\.(\d+)\.conv([123])\.weight$", r"body.\1.\2.conv\3.weight"),
    (r"^(?:backbone|roi_heads)\.(res[2-5])\.(\d+)\.conv([123])\.norm\.(.+)$", r"body.\1.\2.bn\3.\4"),
    (r"^(?:backbone|roi_heads)\.(res[2-5])\.(\d+)\.shortcut\.weight$", r"body.\1.\2.downsample.0.weight"),
    (r"^(?:backbone|roi_heads)\.(res[2-5])\.(\d+)\.shortcut\.norm\.(.+)$", r"body.\1.\2.downsample.1.\3"),
    (r"^proposal_generator\.rpn_head\.conv\.(weight|bias)$", r"rpn.head.conv.\1"),
    (r"^roi_heads\.box_predictor\.cls_score\.(weight|bias)$", r"cls_score.\1"),
    (r"^roi_heads\.box_predictor\.bbox_pred\.(weight|bias)$", r"bbox_pred.\1"),
    # MILVLG/bottom-up-attention.pytorch (bua-caffe-frcn-r101_with_attributes.pth)
    (r"^roi_heads\.box_predictor\.cls_embed\.weight$", "attribute_head.class_embedding.weight"),
    (r"^roi_heads\.box_predictor\.attr_linear1\.(weight|bias)$", r"attribute_head.hidden.\1"),
    (r"^roi_heads\.box_predictor\.attr_linear2\.(weight|bias)$", r"attribute_head.score.\1"),
    # airsplay/py-bottom-up-attention (faster_rcnn_from_caffe_attr.pkl)
    (r"^roi_heads\.box_predictor\.cls_embedding\.weight$", "attribute_head.class_embedding.weight"),
    (r"^roi_heads\.box_predictor\.fc_attr\.(weight|bias)$", r"attribute_head.hidden.\1"),
    (r"^roi_heads\.box_predictor\.attr_score\.(weight|bias)$", r"attribute_head.score.\1"),
]
_PORT_RPN = {"proposal_generator.rpn_head.objectness_logits": "rpn.head.objectness",
             "proposal_generator.rpn_head.anchor_deltas": "rpn.head.deltas"}
# Buffers a detectron2 model saves that carry no weights of ours.
_PORT_IGNORED = re.compile(r"(^pixel_(mean|std)$|anchor_generator\.cell_anchors|num_batches_tracked$)")


def _infer_backbone(state: dict[str, Tensor], prefix: str) -> Backbone:
    stage_blocks = []
    for stage in ("res2", "res3", "res4", "res5"):
        pattern = re.compile(rf"^{prefix[stage]}\.{stage}\.(\d+)\.")
        stage_blocks.append(len({int(m.group(1)) for k in state if (m := pattern.match(k))}))
    bottleneck = any(".conv3." in k for k in state)
    for name, blocks in BUA_BLOCKS.items():
        if tuple(stage_blocks) == blocks and bottleneck == (name not in ("resnet18", "resnet34")):
            return name  # type: ignore[return-value]
    raise ValueError(f"a ResNet with {stage_blocks} blocks per stage (bottleneck: {bottleneck}) is none of "
                     f"{ {k: v for k, v in BUA_BLOCKS.items()} }")


def _from_port(state: dict[str, Tensor], source: str) -> tuple[BUASpec, dict[str, Tensor]]:
    """Map a MILVLG (Caffe class order: background first, 2-way RPN softmax, 1601x4 regression) or an
    airsplay (detectron2 order: background last, one RPN logit per anchor in size-major anchor order,
    1600x4 regression) state dict onto ours."""
    state = {k.removeprefix("module."): v for k, v in state.items() if not _PORT_IGNORED.search(k)}
    objectness = state.get("proposal_generator.rpn_head.objectness_logits.weight")
    deltas = state.get("proposal_generator.rpn_head.anchor_deltas.weight")
    cls = state.get("roi_heads.box_predictor.cls_score.weight")
    if objectness is None or deltas is None or cls is None:
        raise ValueError(f"{source}: not a bottom-up-attention detector: no RPN or box predictor weights "
                         "(expected proposal_generator.rpn_head.* and roi_heads.box_predictor.*, as the MILVLG "
                         "and airsplay ports name them, or a file written by vlbert-prep)")
    anchors = deltas.shape[0] // 4
    layout = "milvlg" if objectness.shape[0] == 2 * anchors else "airsplay"
    if anchors != 12:
        raise ValueError(f"{source}: {anchors} anchors per cell; the Caffe model has 12 (4 scales x 3 ratios)")
    num_classes = int(cls.shape[0])
    attr = state.get("roi_heads.box_predictor.attr_linear2.weight",
                     state.get("roi_heads.box_predictor.attr_score.weight"))
    spec = BUASpec(backbone=_infer_backbone(state, {"res2": "backbone", "res3": "backbone", "res4": "backbone",
                                                    "res5": "roi_heads"}),
                   num_classes=num_classes, num_attributes=int(attr.shape[0]) if attr is not None else 0)
    mapped: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        stem = key.rsplit(".", 1)[0]
        if stem in _PORT_RPN:
            mapped[f"{_PORT_RPN[stem]}.{key.rsplit('.', 1)[1]}"] = value
            continue
        for pattern, target in _PORT_RESNET:
            if re.match(pattern, key):
                mapped[re.sub(pattern, target, key)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"{source}: {len(unmapped)} weights this detector has no place for, e.g. {unmapped[:6]}")
    ratio_major = torch.arange(anchors).reshape(len(spec.anchor_scales), len(spec.anchor_ratios)).T.reshape(-1)
    if layout == "milvlg":
        for suffix in ("weight", "bias"):
            both = mapped[f"rpn.head.objectness.{suffix}"]
            mapped[f"rpn.head.objectness.{suffix}"] = both[anchors:] - both[:anchors]  # fg - bg logit
    else:
        # detectron2 enumerates sizes, then ratios; Caffe ratios, then scales: reorder the anchor channels.
        for suffix in ("weight", "bias"):
            mapped[f"rpn.head.objectness.{suffix}"] = mapped[f"rpn.head.objectness.{suffix}"][ratio_major]
            flat = mapped[f"rpn.head.deltas.{suffix}"]
            grouped = flat.reshape(anchors, 4, *flat.shape[1:])
            mapped[f"rpn.head.deltas.{suffix}"] = grouped[ratio_major].reshape(flat.shape)
        caffe_order = torch.cat((torch.tensor([num_classes - 1]), torch.arange(num_classes - 1)))
        for key in ("cls_score.weight", "cls_score.bias", "attribute_head.class_embedding.weight"):
            if key in mapped:
                mapped[key] = mapped[key][caffe_order]
        for suffix in ("weight", "bias"):
            regression = mapped[f"bbox_pred.{suffix}"]
            if regression.shape[0] == (num_classes - 1) * 4:  # no background row: add a zero one
                mapped[f"bbox_pred.{suffix}"] = torch.cat((regression.new_zeros(4, *regression.shape[1:]), regression))
    return spec, mapped


def load_detector_weights(path: str | Path) -> tuple[BUASpec, dict[str, Tensor]]:
    """A detector file -> its architecture and a state dict in our names (never running code in it)."""
    from vlbert_ds.model.weight_files import read_weight_file

    state = read_weight_file(path)
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if DETECTOR_METADATA_KEY in metadata:
            return BUASpec.from_json(metadata[DETECTOR_METADATA_KEY]), state
    if any(k.startswith("body.") for k in state):
        raise ValueError(f"{path}: our detector names without the architecture metadata; write it with "
                         "vlbert-prep train-detector or convert-detector")
    return _from_port(state, str(path))


def build_bua_detector(weights: str | Path | None, spec: BUASpec | None = None,
                       **spec_overrides) -> BottomUpAttentionDetector:
    """A detector from a weights file (architecture read from it) or, without one, random weights of `spec`."""
    if weights is None:
        return BottomUpAttentionDetector(dataclasses.replace(spec or BUASpec(), **spec_overrides)).eval()
    found, state = load_detector_weights(weights)
    detector = BottomUpAttentionDetector(dataclasses.replace(found, **spec_overrides))
    load_exactly(detector, state, f"{weights} does not fit a {found.backbone} bottom-up-attention detector")
    return detector.eval()


def parse_detector_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`bua:WEIGHTS`, `torchvision:ARCH:WEIGHTS` (or `torchvision:ARCH` for random weights, tests only)
    -> (kind, arch, weights)."""
    parts = spec.split(":", 2)
    if parts[0] == "torchvision" and len(parts) >= 2 and parts[1]:
        return "torchvision", parts[1], parts[2] if len(parts) > 2 and parts[2] else None
    if parts[0] == "bua" and len(parts) >= 2 and parts[1]:
        return "bua", None, spec.split(":", 1)[1]
    raise ValueError(f"--detector {spec!r}: expected bua:WEIGHTS (a bottom-up-attention detector: ours, or the "
                     "MILVLG / airsplay ports' .pth / .pkl) or torchvision:ARCH:WEIGHTS (e.g. "
                     "torchvision:fasterrcnn_resnet50_fpn_v2:weights.pth)")


def build_region_detector(spec: str, min_size: int | None = None, max_size: int | None = None,
                          proposals: int = 300) -> nn.Module:
    """The detector a `--detector` spec names, ready for `detector(images) -> list[ImageRegions]`.

    For `bua:`, sizes left as None keep the file's (600 / 1000 for the released model)."""
    kind, arch, weights = parse_detector_spec(spec)
    if kind == "bua":
        overrides = {"rpn_post_nms": proposals}
        if min_size is not None:
            overrides["min_size"] = min_size
        if max_size is not None:
            overrides["max_size"] = max_size
        return build_bua_detector(weights, **overrides)
    return TorchvisionRegionDetector(arch, weights, min_size=min_size or 600, max_size=max_size or 1000,
                                     proposals=proposals)
