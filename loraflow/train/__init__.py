"""`loraflow train`: the gate-training recipe (recipe), its config and presets (config), the run folder (state),
processes and FSDP2 (distributed), the dev metric (dev_metric) and the LoRA-Hub baseline's search (lorahub)."""
