"""The OpenAI-compatible HTTP API (FastAPI) over a Batcher: /v1/models, /v1/completions, /v1/chat/completions, /health.

The event loop only parses requests and turns tokens into text. Tokenizing runs on a small thread
pool and chat templates render in a killable child process (engine.infer.serve.render), so neither a
huge prompt nor a looping template stalls /health or other clients; the model runs on the batcher's
thread, which hands tokens back through `loop.call_soon_threadsafe`. Read timeouts, the connection
cap and the body checks live in engine.infer.serve.guards. Stop strings are applied here, on text:
the text matching a stop string is never sent, and a streamed piece that could be the start of one
is held back until it is known not to be.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.infer.serve.batcher import Batcher, QueueFull, SamplingParams
from engine.infer.serve.guards import RequestGuard
from engine.infer.serve.render import ChatRenderer, TemplateFailed, TemplateRejected
from engine.infer.serve.schemas import APIError, ChatRequest, CompletionRequest
from engine.data.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError

log = logging.getLogger("engine.infer.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; anything above is a 400 (413 for the body), never a silent cut."""

    max_prompt_tokens: int = 4096  # further capped by the batcher's context (prompt + completion)
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON
    # Slow or stalled clients (engine.infer.serve.guards):
    header_timeout_s: float = 10.0  # request line + headers, from connect (or from the last response)
    body_timeout_s: float = 30.0  # the whole body, from the end of the headers (then 408, connection closed)
    max_connections: int = 512  # API requests in progress at once, streams included (then 503); /health is apart
    # Chat templates (engine.infer.serve.render):
    template_timeout_s: float = 2.0  # one render; then the render process is killed and the request gets 500
    max_template_chars: int = 1 << 21  # longest rendered conversation


# ---------------------------------------------------------------------------- generation as text
def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Generation:
    """One request running in the batcher, read as text pieces; `finish_reason` and token counts once done."""

    def __init__(self, batcher: Batcher, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                 stops: list[str]):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stops, self.prompt_tokens, self.completion_tokens = stops, len(prompt), 0
        self.finish_reason: Optional[str] = None
        self.decoder = IncrementalDecoder(tokenizer)

        def emit(kind, value):  # batcher thread -> this request's event loop
            loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

        try:
            self.seq = batcher.submit(prompt, params, emit)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}", type="server_error", code="rate_limit_exceeded") from None
        except ValueError as e:  # prompt + max_tokens do not fit the context
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def pieces(self) -> AsyncIterator[str]:
        """Text as it becomes final; cancels the sequence when the caller stops early or a stop string ends it."""
        text, sent, longest = "", 0, max(map(len, self.stops), default=0)
        try:
            while self.finish_reason is None:
                kind, value = await self.queue.get()
                if kind == "error":
                    raise APIError(500, f"generation failed: {value}", type="server_error")
                if kind == "token":
                    self.completion_tokens += 1
                    text += self.decoder.push(value)
                else:
                    text += self.decoder.flush()
                    self.finish_reason = "length" if value == "length" else "stop"
                hits = [i for i in (text.find(s, max(0, sent - longest)) for s in self.stops) if i >= 0]
                if hits:
                    text, self.finish_reason = text[:min(hits)], "stop"
                safe = len(text) if self.finish_reason else len(text) - _held_back(text, self.stops)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
        finally:
            self.seq.cancel()  # a no-op when the batcher already finished it; else frees the row now


# ---------------------------------------------------------------------------- the app
def _chat_template_problem(tokenizer: Tokenizer) -> Optional[str]:
    """Why chat requests cannot be served (logged once, at start-up), or None."""
    try:
        tokenizer.get_chat_template()
        return None
    except TokenizerError as e:
        log.warning("%s: /v1/chat/completions will answer 400 (use /v1/completions)", e)
        return str(e)


def create_app(batcher: Batcher, tokenizer: Tokenizer, model_name: str, *, api_key: Optional[str] = None,
               limits: ServeLimits = ServeLimits(), eos_ids: tuple[int, ...] = ()) -> FastAPI:
    """The FastAPI app serving `batcher`'s model as `model_name`; shuts the batcher down with the app."""
    created = int(time.time())
    eos_ids = tuple(sorted({*eos_ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}))
    max_prompt = min(limits.max_prompt_tokens, batcher.max_len - 1)
    no_chat = _chat_template_problem(tokenizer)
    renderer = ChatRenderer(tokenizer, limits.template_timeout_s, limits.max_template_chars)
    # Off the event loop: tokenizing, and (apart, so that renders waiting out a looping template never hold up
    # tokenizing for /v1/completions) waiting on the render process, which renders one conversation at a time.
    tokenize_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="engine-serve-tokenize")
    render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-serve-render")

    async def off_loop(pool, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    async def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: `tokenizers` releases the GIL in its batch call, while encode, even on a worker
        # thread, kept the event loop waiting ~2 s on a 0.9 MB prompt (test_a_huge_prompt_is_tokenized_off_...).
        return (await off_loop(tokenize_pool, tokenizer.encode_batch, [text],
                               add_special_tokens=add_special_tokens))[0]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        renderer.close()
        tokenize_pool.shutdown(wait=False, cancel_futures=True)
        render_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.limits = limits  # guards.server_config reads the header timeout and connection cap from here
    app.state.batcher, app.state.renderer = batcher, renderer
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, body_timeout_s=limits.body_timeout_s,
                       max_requests=limits.max_connections)

    # -------------------------------------------------------------- errors: always OpenAI-shaped JSON
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") in ("lone_surrogate", "too_deep"):  # schemas.body_problem
            return await _api_error(request, APIError(400, err["msg"], param=err["ctx"]["path"]))
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            return await _api_error(request, APIError(400, f"the body is not valid JSON: {detail}"))
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Union members show up in loc (e.g. 'str', 'list[int]'); keep the field path only.
        param = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float"))
        message = "unsupported parameter" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        return await _api_error(request, APIError(400, f"{param or 'body'}: {message}", param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "request_too_large"}.get(e.status_code)
        error = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code)
        return JSONResponse(error.body(), status_code=error.status, headers=e.headers)  # e.g. Connection: close

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    # -------------------------------------------------------------- auth
    async def check_key(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided (expected 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "engine"}

    def check_model(name: str):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist (this server serves '{model_name}')",
                           param="model", code="model_not_found")

    def sampling(body, prompt_tokens: int, max_tokens: Optional[int]) -> SamplingParams:
        if prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if prompt_tokens > max_prompt:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; this server accepts at most {max_prompt}",
                           param="prompt", code="context_length_exceeded")
        room = batcher.max_len - prompt_tokens
        if max_tokens is None:  # chat: as much as fits, up to the server's cap
            max_tokens = min(room, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is above this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {batcher.max_len} tokens. However, you "
                           f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                           f"{max_tokens} for the completion).", param="max_tokens", code="context_length_exceeded")
        greedy = body.temperature == 0 or body.top_p == 0
        return SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else body.temperature,
                              top_p=body.top_p if body.top_p < 1 else None, seed=body.seed, eos_ids=eos_ids)

    # -------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **batcher.load}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request, got a batch of {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < batcher.model.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                               f"[0, {batcher.model.config.vocab_size})", param="prompt")
        gen = Generation(batcher, tokenizer, ids, sampling(body, len(ids), body.max_tokens), body.stop)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish_reason=None):
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        if body.stream:
            return _sse(gen, lambda piece: chunk(piece), lambda: chunk("", gen.finish_reason),
                        lambda: {**chunk(""), "choices": [], "usage": gen.usage()}, body)
        text = await _collect(gen, request)
        return {**chunk(text, gen.finish_reason), "usage": gen.usage()}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        if no_chat is not None:
            raise APIError(400, f"messages: cannot apply the chat template: {no_chat}", param="messages")
        messages = []
        for m in body.messages:
            message = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):  # text parts are joined; other part types were rejected by the schema
                message["content"] = "".join(part.text for part in m.content)
            messages.append(message)
        try:
            text = await off_loop(render_pool, renderer.render, messages, add_generation_prompt=True)
        except TemplateRejected as e:
            raise APIError(400, f"messages: cannot apply the chat template: {e}", param="messages") from None
        except TemplateFailed as e:
            raise APIError(500, str(e), type="server_error", code="chat_template_failed") from None
        # As apply_chat_template(tokenize=True): the template already wrote any BOS text.
        ids = await encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        gen = Generation(batcher, tokenizer, ids, sampling(body, len(ids), max_tokens), body.stop)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta, finish_reason=None, obj="chat.completion.chunk"):
            key = "delta" if obj.endswith("chunk") else "message"
            return {"id": rid, "object": obj, "created": now, "model": model_name,
                    "choices": [{"index": 0, key: delta, "logprobs": None, "finish_reason": finish_reason}]}

        if body.stream:
            first = [True]

            def piece_chunk(piece):
                delta = {"role": "assistant", "content": piece} if first[0] else {"content": piece}
                first[0] = False
                return chunk(delta)

            return _sse(gen, piece_chunk, lambda: chunk({}, gen.finish_reason),
                        lambda: {**chunk({}), "choices": [], "usage": gen.usage()}, body, opening=piece_chunk(""))
        text = await _collect(gen, request)
        return {**chunk({"role": "assistant", "content": text}, gen.finish_reason, obj="chat.completion"),
                "usage": gen.usage()}

    return app


async def _collect(gen: Generation, request: Request) -> str:
    """The whole text of a non-streamed request; stops generating if the client disconnects meanwhile."""
    async def read():
        return "".join([piece async for piece in gen.pieces()])

    task = asyncio.ensure_future(read())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client closed the request")
    finally:
        if not task.done():
            task.cancel()
            gen.seq.cancel()


def _sse(gen: Generation, piece_chunk, final_chunk, usage_chunk, body, opening=None) -> StreamingResponse:
    """Server-sent events as the OpenAI API streams them: `data: {chunk}` lines, then `data: [DONE]`."""
    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def events():
        # When the client disconnects, Starlette cancels this generator: gen.pieces()' finally frees the row.
        try:
            if opening is not None:
                yield event(opening)
            async for piece in gen.pieces():
                yield event(piece_chunk(piece))
            yield event(final_chunk())
            if body.stream_options is not None and body.stream_options.include_usage:
                yield event(usage_chunk())
        except APIError as e:  # the status line is already sent: report in-band, as OpenAI does
            yield event(e.body())
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
