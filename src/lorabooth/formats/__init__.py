"""LoRA and checkpoint files: layouts, single files, merging, inspection.

The names of a run's LoRA files live here, the one place that spells them
(this module imports nothing, so the torch-free write guard and web page can
use them too)."""

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers (and peft) layout
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"  # kohya layout (AUTOMATIC1111, ComfyUI)
LORA_FILES = {"diffusers": WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}  # layout -> file name
