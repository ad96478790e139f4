"""kernels: fused ops with exact pure-PyTorch fallbacks (filled in by the kernels work)."""
