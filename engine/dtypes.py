"""The one table of dtype names: what `--dtype`, `lora.base_dtype` and `train.precision` mean as torch dtypes."""
from __future__ import annotations

import torch

from engine.config.parsing import ConfigError

# Short names as configs and flags write them, and torch's own names, so `--dtype bfloat16` works too.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def dtype_named(name: str | torch.dtype, where: str = "dtype") -> torch.dtype:
    """The torch dtype for a name in DTYPES (a torch.dtype passes through); an unknown name is a ConfigError."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"{where}: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
