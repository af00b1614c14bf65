"""The trained adapters: LoRA (and DoRA) attached with peft, pivotal tuning's token rows."""
