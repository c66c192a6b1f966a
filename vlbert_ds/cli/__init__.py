"""Command lines: `vlbert-pretrain` and `vlbert-finetune` (launchers over `vlbert_ds.train` recipes).

A launcher parses the command line, loads and validates the config, joins the process group, does
what comes before training (the embedded default data) and starts the recipe.
"""
