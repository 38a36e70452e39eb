"""The OpenAI request bodies the server accepts (pydantic), and the response objects it returns.
Parameters the server cannot honour are refused with a clear message rather than ignored."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: no end-of-sequence before this many tokens
    # accepted at their neutral values only
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        """Why the request asks for something the server does not do, or None."""
        if self.n != 1:
            return "n must be 1: send one request per completion (they are batched together anyway)."
        if self.frequency_penalty or self.presence_penalty:
            return "frequency_penalty and presence_penalty are not supported; leave them at 0."
        if self.logprobs not in (None, False, 0):
            return "logprobs are not supported."
        if self.logit_bias:
            return "logit_bias is not supported."
        stops = self.stops()
        if len(stops) > 4:
            return f"stop takes up to 4 strings, got {len(stops)}."
        return None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo is not supported."
        if self.best_of not in (None, 1):
            return "best_of must be 1."
        if self.suffix:
            return "suffix (insertion) is not supported."
        if isinstance(self.prompt, list) and not self.prompt:
            return "prompt is an empty list: give a string or a list of strings."
        return super().unsupported()

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are passed to the chat template
    role: str
    content: str | list[ContentPart] | None = None

    def for_template(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.tools or self.tool_choice not in (None, "none"):
            return "tools are not supported."
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format other than text is not supported."
        return super().unsupported()

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion(rid, model, texts, finishes, usage) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                        for i, (t, f) in enumerate(zip(texts, finishes))], "usage": usage}


def completion_chunk(rid, model, index, text, finish=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}


def chat(rid, model, text, finish, usage) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}], "usage": usage}


def chat_chunk(rid, model, delta: dict, finish=None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(rid, model, obj: str, usage: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage}


def error_body(message: str, status: int, code: str | None = None, param: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            422: "invalid_request_error", 503: "server_error", 504: "timeout"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
