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

The bottom-up-attention Faster R-CNN (ResNet-101 C4, 1601 Visual Genome classes, sharing the
end-to-end front end's ResNet) is not built yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import nms

NMS_IOU, CONF_THRESHOLD, MIN_BOXES, MAX_BOXES = 0.3, 0.5, 10, 100


@dataclass
class ImageRegions:
    """One image's regions, in pixels of the image as given."""

    boxes: Tensor  # [K, 4] float32 x1, y1, x2, y2
    features: Tensor  # [K, D] float32
    scores: Tensor  # [K, C] float32 class distribution (index 0 = background)
    confidence: Tensor  # [K] the selection confidence, descending


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
        keep = nms(boxes, class_scores, nms_iou)
        max_conf[keep] = torch.maximum(max_conf[keep], class_scores[keep])
    order = torch.argsort(max_conf, descending=True, stable=True)
    passing = int((max_conf >= threshold).sum())
    kept = order[: min(max(passing, min_boxes), max_boxes, count)]
    return kept, max_conf[kept]


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
            ours = self.net.state_dict()
            missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")]
            unexpected = [k for k in state if k not in ours]
            mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
                          if k in state and state[k].shape != v.shape]
            if missing or unexpected or mismatched:
                raise ValueError(f"{weights} does not fit torchvision's {arch} with {num_classes} classes: "
                                 f"{len(missing)} missing (e.g. {missing[:4]}), {len(unexpected)} unexpected "
                                 f"(e.g. {unexpected[:4]}), {len(mismatched)} of another shape (e.g. {mismatched[:3]})")
            self.net.load_state_dict(state, strict=False)
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


def parse_detector_spec(spec: str) -> tuple[str, str, str | None]:
    """`torchvision:ARCH:WEIGHTS` (or `torchvision:ARCH` for random weights, tests only) -> parts."""
    parts = spec.split(":", 2)
    if parts[0] == "torchvision" and len(parts) >= 2 and parts[1]:
        return "torchvision", parts[1], parts[2] if len(parts) > 2 and parts[2] else None
    if parts[0] == "bua":
        raise ValueError("--detector bua:WEIGHTS: the bottom-up-attention detector is not built yet; use "
                         "torchvision:ARCH:WEIGHTS, or an existing bottom-up-attention TSV with --regions")
    raise ValueError(f"--detector {spec!r}: expected torchvision:ARCH:WEIGHTS (e.g. "
                     "torchvision:fasterrcnn_resnet50_fpn_v2:weights.pth)")
