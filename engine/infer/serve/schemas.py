"""OpenAI request bodies (the subset we serve) and OpenAI-shaped errors.

Unknown fields are rejected rather than ignored, so a client asking for something we do not do
(`logprobs`, `tools`, `n=2`, ...) gets a 400 naming it instead of a silently different answer.
"""
from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP = 4  # as the OpenAI API
# json.loads joins an escaped surrogate pair into one code point, so any surrogate left in a str is a lone one:
# it cannot be encoded to UTF-8 (the tokenizer and our own JSON responses would fail on it).
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_DEPTH = 32  # arrays/objects within each other; a chat request needs ~5 (messages[0].content[0].text)


class APIError(Exception):
    """An error the client caused (or must know about), answered as OpenAI's {"error": {...}} JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def body_problem(data) -> Optional[tuple[str, str, str]]:
    """The first (kind, JSON path, detail) wrong with a parsed body, else None: kind "lone_surrogate" for a string
    (key or value) holding one (detail: the code point), "too_deep" for arrays/objects nested past MAX_DEPTH."""
    stack = [(data, "", 0)]  # "" is the body itself
    while stack:  # a loop, not recursion: a body nested 900 deep must get a 400, not a RecursionError
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if found := _SURROGATE.search(value):
                return "lone_surrogate", path or "body", f"U+{ord(found.group()):04X}"
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            return "too_deep", path or "body", str(MAX_DEPTH)
        children = []
        for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
            if isinstance(key, int):
                where = f"{path}[{key}]"
            else:  # a bad key is named as \udXXX: the error message itself must be valid Unicode
                name = key.encode("utf-8", "backslashreplace").decode("utf-8")
                where = f"{path}.{name}" if path else name
                if found := _SURROGATE.search(key):
                    return "lone_surrogate", where, f"U+{ord(found.group()):04X}"
            children.append((item, where, depth + 1))
        stack.extend(reversed(children))  # depth-first in document order: the first problem is reported
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    n: int = 1
    stop: Union[str, list[str], None] = Field(None, validate_default=True)  # -> a list of 0..4 strings
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted and ignored, as an end-user id for abuse tracking is

    @model_validator(mode="before")
    @classmethod
    def _well_formed(cls, data):
        problem = body_problem(data)
        if problem is None:
            return data
        kind, path, detail = problem
        message = {"lone_surrogate": "{path}: contains a lone UTF-16 surrogate ({detail}); strings must be valid "
                                     "Unicode",
                   "too_deep": "{path}: nested more than {detail} arrays/objects deep"}[kind]
        raise PydanticCustomError(kind, message, {"path": path, "detail": detail})

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n):
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    # A string, a list of token ids, or a batch of one of either (the batch form is what some clients send).
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # templates may read more keys (name, tool_calls, ...)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
