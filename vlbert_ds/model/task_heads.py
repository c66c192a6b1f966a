"""Fine-tuning heads for VQA, VCR and RefCOCO+ (reference §3), on top of `VLBertModel`.

- VQA: `[CLS] question [SEP] [MASK] [SEP] RoIs [END]`; the [MASK] output goes through the MLM
  transform (initialised from the pretrained MLM head), dropout 0.1 and Linear(H -> answers); loss
  BCE-with-logits against the soft VQA scores, summed over answers and averaged over the batch
  (`BCE x 3129` in the official code).
- VCR: one sequence per choice, `[CLS] Q [SEP] A_i [SEP] RoIs [END]`; the pooled [CLS] through dropout
  0.1 and Linear(H -> 1) gives one logit per choice; loss BCE per choice (the official
  `CLASSIFIER_SIGMOID: true`; the paper says softmax). With `config.num_object_classes` > 0, the
  official auxiliary RoI classification (`ENABLE_CNN_REG_LOSS`, weight 1): every RoI output of every
  choice row through the MRC transform (initialised from the pretrained MRC head) and
  Linear(H -> classes), cross-entropy against the box's detector category (RoI 0 = class 0). Segment
  B's embedding starts as a copy of segment A's (official `PARTIAL_PRETRAIN_SEGMB_INIT`): VL-BERT
  pretraining never uses B, so its row is still BERT's.
- RefCOCO+: `[CLS] expression [SEP] RoIs [END]`; each RoI output goes through the MRC transform
  (initialised from the pretrained MRC head), Linear(H -> 1); loss BCE against IoU(box, target) > 0.5.
  RoI 0 (the whole image) is never a candidate here, which the official code leaves to the labels.

Classifier layers start Xavier-uniform with zero bias, as the official code. `from_pretraining`
loads a `VLBertForPretraining` save_pretrained folder and maps its heads' transforms as the official
`PARTIAL_PRETRAIN_PREFIX_CHANGES` do; `from_bert` (BERT-only initialisation) is the ablation baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlbert_ds.model.config import VLBertConfig
from vlbert_ds.model.geometry import box_iou_pixels
from vlbert_ds.model.heads import MLMTransform, MRCTransform
from vlbert_ds.model.inputs import VLBatch
from vlbert_ds.model.loading import CONFIG_NAME, WeightLoadReport, load_weights_state
from vlbert_ds.model.modeling import VLBertModel, _Pretrained, init_bert_weights


@dataclass
class TaskBatch:
    """A `VLBatch` plus the targets of one task; rows are sequences (VCR: `num_choices` rows per item)."""

    batch: VLBatch
    answer_positions: Tensor | None = None  # VQA [B] long: text index of the answer [MASK]
    answer_targets: Tensor | None = None  # VQA [B, A] float: soft VQA scores over the answer vocabulary
    num_choices: int = 0  # VCR: rows per item (4)
    choice_labels: Tensor | None = None  # VCR [B / num_choices] long: the right choice
    object_labels: Tensor | None = None  # VCR [B, R] long: detector category per RoI, -1 = unknown
    region_labels: Tensor | None = None  # RefCOCO+ [B, R] float: IoU(box, target) > 0.5
    target_boxes: Tensor | None = None  # RefCOCO+ [B, 4]: the referred box, for the IoU >= 0.5 accuracy
    keys: list[str] = field(default_factory=list)  # item ids, for error messages and predictions

    def to(self, device: torch.device | str) -> TaskBatch:
        moved = {name: (value.to(device) if isinstance(value, Tensor) else value)
                 for name, value in self.__dict__.items() if name != "batch"}
        return TaskBatch(batch=self.batch.to(device), **moved)

    @property
    def batch_size(self) -> int:
        return self.batch.batch_size // max(1, self.num_choices) if self.num_choices else self.batch.batch_size


@dataclass
class TaskOutput:
    loss: Tensor | None
    logits: Tensor  # VQA [B, A]; VCR [items, choices]; RefCOCO+ [B, R] (-inf where not a candidate)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # summed over the batch, with "count"
    losses: dict[str, Tensor] = field(default_factory=dict)  # the parts of `loss` when it has several
    metric_name: str = ""  # the task metric that metrics[...] sums (vqa_accuracy, accuracy, accuracy_iou50)

    def weighted_metrics(self) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (mean over the batch's items, items): what a trainer averages over micro-batches."""
        count = self.metrics.get("count")
        if count is None or not self.metric_name:
            return {}
        total = sum(v for k, v in self.metrics.items() if k != "count")
        return {self.metric_name: (total / count.clamp(min=1), count)}


def _classifier(hidden: int, outputs: int) -> nn.Linear:
    layer = nn.Linear(hidden, outputs)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _TaskModel(_Pretrained):
    """Shared loading: `from_pretraining` maps a pretraining folder's encoder and one head transform."""

    bert_prefix = "vlbert."
    # (our parameter prefix, the pretraining checkpoint's prefix) for the transform this head inherits.
    transform_from: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def from_pretraining(cls, folder: str | Path, **overrides: Any):
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; is it a pretraining save_pretrained folder?")
        config = VLBertConfig.from_dict({**VLBertConfig.load(folder / CONFIG_NAME).to_dict(), **overrides})
        model = cls(config)
        renames = [("vlbert.", "vlbert.")] + ([cls.transform_from] if cls.transform_from else [])
        model.load_report = load_weights_state(model, folder, renames)
        return model


class VLBertForVQA(_TaskModel):
    transform_from = ("transform.", "mlm_head.transform.")

    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        if config.num_answers < 1:
            raise ValueError("VLBertForVQA needs config.num_answers >= 1 (the answer vocabulary size)")
        self.config = config
        self.vlbert = VLBertModel(config)
        self.transform = MLMTransform(config)
        init_bert_weights(self.transform, config.initializer_range)
        self.dropout = nn.Dropout(0.1)
        self.classifier = _classifier(config.hidden_size, config.num_answers)

    def forward(self, task: TaskBatch) -> TaskOutput:
        out = self.vlbert(task.batch)
        rows = torch.arange(out.text_output.shape[0], device=out.text_output.device)
        hidden = out.text_output[rows, task.answer_positions]
        logits = self.classifier(self.dropout(self.transform(hidden))).float()
        if task.answer_targets is None:
            return TaskOutput(None, logits)
        targets = task.answer_targets.float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
        score = targets.gather(1, logits.argmax(1, keepdim=True)).sum()  # VQA accuracy of the top answer
        return TaskOutput(loss, logits, {"vqa_score": score.detach(), "count": torch.tensor(float(logits.shape[0]))},
                          metric_name="vqa_accuracy")


class VLBertForMultipleChoice(_TaskModel):
    """VCR Q->A or QA->R: one logit per choice from the pooled [CLS] (+ the auxiliary RoI classes)."""

    transform_from = ("object_transform.", "mrc_head.transform.")

    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        if not config.with_pooler:
            raise ValueError("VLBertForMultipleChoice needs config.with_pooler=True (it scores the pooled [CLS])")
        self.config = config
        self.vlbert = VLBertModel(config)
        self.dropout = nn.Dropout(0.1)
        self.classifier = _classifier(config.hidden_size, 1)
        if config.num_object_classes > 0:
            self.object_transform = MRCTransform(config)
            init_bert_weights(self.object_transform, config.initializer_range)
            self.object_classifier = _classifier(config.hidden_size, config.num_object_classes)

    @classmethod
    def from_pretraining(cls, folder: str | Path, **overrides: Any):
        return cls._copy_segment_a_to_b(super().from_pretraining(folder, **overrides))

    @classmethod
    def from_bert(cls, folder: str | Path, **overrides: Any):
        return cls._copy_segment_a_to_b(super().from_bert(folder, **overrides))

    @staticmethod
    def _copy_segment_a_to_b(model):
        with torch.no_grad():
            table = model.vlbert.embeddings.token_type_embeddings.weight
            table[1].copy_(table[0])
        return model

    def forward(self, task: TaskBatch) -> TaskOutput:
        out = self.vlbert(task.batch)
        logits = self.classifier(self.dropout(out.pooled_output)).float().view(-1, task.num_choices)
        if task.choice_labels is None:
            return TaskOutput(None, logits)
        one_hot = nn.functional.one_hot(task.choice_labels, task.num_choices).float()
        losses = {"choice": nn.functional.binary_cross_entropy_with_logits(logits, one_hot)}
        if self.config.num_object_classes > 0 and task.object_labels is not None:
            known = task.batch.region_mask.bool() & (task.object_labels >= 0)
            if known.any():
                object_logits = self.object_classifier(self.object_transform(out.region_output[known])).float()
                losses["object_classes"] = nn.functional.cross_entropy(object_logits, task.object_labels[known])
        loss = losses["choice"] + losses["object_classes"] if "object_classes" in losses else losses["choice"]
        correct = (logits.argmax(1) == task.choice_labels).float().sum()
        return TaskOutput(loss, logits, {"correct": correct.detach(), "count": torch.tensor(float(logits.shape[0]))},
                          losses=losses, metric_name="accuracy")


class VLBertForReferring(_TaskModel):
    """RefCOCO+: one logit per RoI; the top RoI is the answer."""

    transform_from = ("transform.", "mrc_head.transform.")

    def __init__(self, config: VLBertConfig) -> None:
        super().__init__()
        self.config = config
        self.vlbert = VLBertModel(config)
        self.transform = MRCTransform(config)
        init_bert_weights(self.transform, config.initializer_range)
        self.classifier = _classifier(config.hidden_size, 1)

    def forward(self, task: TaskBatch) -> TaskOutput:
        batch = task.batch
        out = self.vlbert(batch)
        candidates = batch.region_mask.bool().clone()
        candidates[:, 0] = False  # RoI 0 is the whole image
        logits = self.classifier(self.transform(out.region_output)).squeeze(-1).float()
        logits = logits.masked_fill(~candidates, float("-inf"))
        if task.region_labels is None:
            return TaskOutput(None, logits)
        labels = task.region_labels[candidates].float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits[candidates], labels)
        rows = torch.arange(logits.shape[0], device=logits.device)
        chosen = batch.boxes[rows, logits.argmax(1)].float()
        correct = referring_hits(chosen, task.target_boxes).sum()
        return TaskOutput(loss, logits, {"correct": correct.detach(), "count": torch.tensor(float(logits.shape[0]))},
                          metric_name="accuracy_iou50")


def referring_hits(chosen: Tensor, targets: Tensor) -> Tensor:
    """1.0 where the chosen box overlaps its target at IoU >= 0.5 (the RefCOCO+ metric), else 0.0."""
    return (box_iou_pixels(chosen, targets).diagonal() >= 0.5).float()


TASK_MODELS: dict[str, type[_TaskModel]] = {"vqa": VLBertForVQA, "vcr": VLBertForMultipleChoice,
                                             "refcoco": VLBertForReferring}
__all__ = ["TASK_MODELS", "TaskBatch", "TaskOutput", "VLBertForMultipleChoice", "VLBertForReferring",
           "VLBertForVQA", "WeightLoadReport", "referring_hits"]
