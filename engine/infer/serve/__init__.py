"""OpenAI-compatible serving with continuous batching: `python -m cli.serve --model DIR`.

engine.infer.serve.batcher  the scheduler: one thread owns the model; one batched decode step per iteration
engine.infer.serve.app      FastAPI routes, SSE streaming, stop strings, limits, API key, OpenAI-shaped errors
engine.infer.serve.schemas  the request bodies we accept and the error type

The web stack (fastapi, uvicorn) is the optional `[serve]` extra; only `app` imports it.
"""
from engine.infer.serve.batcher import Batcher, QueueFull, SamplingParams

__all__ = ["Batcher", "QueueFull", "SamplingParams"]
