"""engine.quant: weight-only quantized base weights (NF4 as QLoRA, int8 per output channel) for QLoRA training
and quantized decoding. The compute is kernels.quant_linear; this package holds the layer and the conversions."""
from engine.quant.layers import (KINDS, QuantLinear, check_dense_trainable, is_quantized, loss_chunk_rows,
                                 quantize, quantize_lm_head, quantized_layers)

__all__ = ["KINDS", "QuantLinear", "check_dense_trainable", "is_quantized", "loss_chunk_rows", "quantize",
           "quantize_lm_head", "quantized_layers"]
