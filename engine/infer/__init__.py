"""Decoding (KV-cache generation, sampling) and the OpenAI-compatible server."""
