"""Parameter-efficient adapters: lora.py (the LoRA layer, apply / merge / disable, LoraState) and
peft_format.py (PEFT's adapter files, both ways)."""
