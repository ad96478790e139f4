"""The Transformer, the per-family tables, and HF model directories (config.json + safetensors) in and out."""
