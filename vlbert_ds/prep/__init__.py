"""`vlbert-prep`: shard preparation (captions, region importers, text, the embedded default)."""
