"""Helpers shared by the adapter tests."""
import torch

from engine.adapters.lora import lora_modules


def randomize_adapters(model, seed=0):
    """B starts at zero (a no-op adapter), which would hide a wrong name or scale: make both factors random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
