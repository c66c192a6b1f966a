"""The data plane: shard format, fsspec storage, masking, and the streaming loader that yields `VLBatch`es."""

from vlbert_ds.data.examples import ExampleConfig, TokenizerTools, collate
from vlbert_ds.data.masking import MaskingConfig
from vlbert_ds.data.pipeline import (
    LoaderBatch,
    LoaderConfig,
    PretrainStream,
    SourceSpec,
    UnusableDataError,
    build_loader,
    pretrain_loader,
)
from vlbert_ds.data.streams import ResumableLoader, ShardStream

__all__ = [
    "ExampleConfig",
    "LoaderBatch",
    "LoaderConfig",
    "MaskingConfig",
    "PretrainStream",
    "ResumableLoader",
    "ShardStream",
    "SourceSpec",
    "TokenizerTools",
    "UnusableDataError",
    "build_loader",
    "collate",
    "pretrain_loader",
]
