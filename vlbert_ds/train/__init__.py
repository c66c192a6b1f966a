"""Training: the engine, the loop, checkpoints, tracking (the demo command until pretraining lands)."""
