"""OpenAI-compatible serving with continuous batching: `python -m cli.serve --model DIR`.

engine.infer.serve.batcher  the scheduler: one thread owns the model; one batched decode step per iteration
engine.infer.serve.app      FastAPI routes, SSE streaming, stop strings, limits, API key, OpenAI-shaped errors
engine.infer.serve.schemas  the request bodies we accept and the error type
engine.infer.serve.guards   read timeouts, the connection cap, body size / Content-Type checks (uvicorn + ASGI)
engine.infer.serve.render   chat templates rendered in a child process, killed past a time limit

The web stack (fastapi, uvicorn) is the optional `[serve]` extra; only `app` and `guards` import it.
"""
from engine.infer.serve.batcher import Batcher, QueueFull, SamplingParams

__all__ = ["Batcher", "QueueFull", "SamplingParams"]
