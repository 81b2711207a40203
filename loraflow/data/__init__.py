"""`loraflow data`: validated readers and training examples (records), prompt templates (prompts), the command (cli)."""
