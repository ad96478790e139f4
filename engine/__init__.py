"""engine: a minimal, readable decoder-only Transformer that loads and saves Hugging Face checkpoints."""
from engine.config import ConfigError, ModelConfig, RopeScaling
from engine.generate import generate, generate_stream
from engine.model import KVCache, Transformer
from engine.tokenizer import Tokenizer, TokenizerError
from engine.weights import WeightsError

__all__ = ["ConfigError", "KVCache", "ModelConfig", "RopeScaling", "Tokenizer", "TokenizerError", "Transformer",
           "WeightsError", "generate", "generate_stream"]
