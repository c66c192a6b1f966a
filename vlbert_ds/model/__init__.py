"""The VL-BERT model library: config, inputs, embeddings, encoder, visual front ends, heads, weights.

Imports nothing of DeepSpeed, shards or MLflow: training, data and tracking build on it.
"""

from vlbert_ds.model.config import PRESETS, VLBertConfig
from vlbert_ds.model.geometry import box_geometry_embedding
from vlbert_ds.model.heads import soft_cross_entropy
from vlbert_ds.model.inputs import VLBatch
from vlbert_ds.model.loading import WeightLoadReport
from vlbert_ds.model.modeling import PretrainingOutput, VLBertForPretraining, VLBertModel, VLBertOutput

__all__ = [
    "PRESETS",
    "PretrainingOutput",
    "VLBatch",
    "VLBertConfig",
    "VLBertForPretraining",
    "VLBertModel",
    "VLBertOutput",
    "WeightLoadReport",
    "box_geometry_embedding",
    "soft_cross_entropy",
]
