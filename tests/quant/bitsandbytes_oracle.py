"""Importing bitsandbytes (the test oracle for NF4; engine/ never imports it) without its import-time warning.

bitsandbytes 0.50's CPU backend tries `from kernels import get_kernel` (the Hugging Face `kernels` package) on
AVX512-BF16 machines and, finding this repository's `kernels` package instead, logs "Failed to load CPU
gemm_4bit_forward from kernels-community: cannot import name 'get_kernel' from 'kernels'". That fallback is
harmless to us (its own CPU code path is used), so the warning is silenced while bitsandbytes is imported.
"""
from __future__ import annotations

import importlib
import logging
import warnings


def import_bitsandbytes(module: str = "bitsandbytes"):
    """`module` (bitsandbytes or a submodule), imported with bitsandbytes' loggers and warnings quiet."""
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    finally:
        log.setLevel(level)
