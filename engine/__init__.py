"""engine: a minimal, readable decoder-only Transformer that loads and saves Hugging Face checkpoints."""
from engine.config import ConfigError, ModelConfig, RopeScaling
from engine.infer.generate import generate, generate_stream
from engine.model.transformer import KVCache, Transformer
from engine.data.tokenizer import Tokenizer, TokenizerError
from engine.model.hf_format import WeightsError
from engine.quant import quantize

__all__ = ["ConfigError", "KVCache", "ModelConfig", "RopeScaling", "Tokenizer", "TokenizerError", "Transformer",
           "WeightsError", "generate", "generate_stream", "quantize"]
