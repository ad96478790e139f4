"""Parameter-efficient adapters (LoRA) in PEFT's file layout."""
