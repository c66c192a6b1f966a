"""Training: run config, rank discovery, the DeepSpeed engine, the loop, checkpoints, MLflow tracking."""
