"""vlbert_ds: VL-BERT pretraining and fine-tuning at scale."""

__version__ = "0.1.0"
