"""engine: a minimal, readable decoder-only Transformer that loads and saves Hugging Face checkpoints."""
