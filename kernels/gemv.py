"""Launcher for the decoding GEMV (kernels/csrc/linear.cpp): out = x @ weight.T (+ bias) for a
few rows of x, where the op is memory-bound and a matrix-vector kernel beats torch's GEMM.

The compiled module is handed in by kernels/__init__.py, which decides when this runs.
"""
from __future__ import annotations

import torch

from kernels.fused_ce import DTYPE_CODES

# Flattened rows of x up to which the GEMV is used. It streams W once for any row count, but
# its arithmetic grows with the rows; measured on 2 Zen 4 cores (bench/bench_linear.py), it
# still beats torch's GEMM (MKL/oneDNN) at 8 rows for every decode shape.
LINEAR_MAX_ROWS = 8
DTYPES = (torch.float32, torch.bfloat16)


def launch(ext, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           rows: int) -> torch.Tensor:
    """x [..., K] (rows = prod of the leading dims) @ weight [N, K].T (+ bias [N]) -> [..., N],
    all on CPU in one dtype (fp32 or bf16), weight and bias contiguous; x may be strided."""
    n, k = weight.shape
    if not x.is_contiguous():
        x = x.contiguous()  # at most a few rows, so the copy is cheap
    out = x.new_empty((*x.shape[:-1], n))
    ext.linear_cpu(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                   out.data_ptr(), DTYPE_CODES[x.dtype], rows, n, k, torch.get_num_threads())
    return out
