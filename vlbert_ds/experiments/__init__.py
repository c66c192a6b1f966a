"""Experiments built from the training recipes (the fine-tuning ablation)."""
