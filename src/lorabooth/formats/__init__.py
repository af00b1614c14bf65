"""LoRA and checkpoint files: layouts, single files, merging, inspection."""
