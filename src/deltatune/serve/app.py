"""`deltatune serve`: one base model, the deltas of a folder, an OpenAI-compatible HTTP API.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models,
POST /v1/deltas/reload, GET /health, GET /metrics (Prometheus). `model` is "BASE", "BASE:DELTA" or
"DELTA". Handlers only parse, check and tokenize; the engine thread (engine.py) does the rest, and
events come back to the handler's event loop through an asyncio queue. Every bad input is answered
with an OpenAI-style error body and a 4xx status; the server keeps serving."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .deltas import DeltaStore, Unusable, check_name
from .engine import Engine, Request
from .metrics import Metrics
from .protocol import (ChatRequest, CompletionRequest, chat, chat_chunk, completion, completion_chunk, error_body,
                       new_id, usage_chunk)
from .sampling import Sampling


@dataclass
class ServeOptions:
    """The server's limits and policies (the CLI's options)."""
    name: str = "base"                 # the base model's name in requests and /v1/models
    max_tokens_cap: int = 1024         # largest max_tokens a request may ask for
    max_context: int = 2048            # prompt + max_tokens (+ a delta's virtual tokens) limit
    api_key: str | None = None         # Bearer key required on every endpoint but /health
    request_timeout: float = 600.0     # seconds before a request is cancelled (504)
    default_completion_tokens: int = 16  # OpenAI's default max_tokens for /v1/completions


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


class _Pending:
    """The handler's side of one engine request: its events, in order, on the handler's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, index: int = 0):
        self.loop, self.index = loop, index
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request: Request | None = None

    def emit(self, kind, *args):  # called on the engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, args))
        except RuntimeError:  # the event loop has closed (shutdown): nobody is waiting any more
            pass


def create_app(engine: Engine, tokenizer, store: DeltaStore, options: ServeOptions) -> FastAPI:
    metrics = Metrics(engine)
    app = FastAPI(title="deltatune", lifespan=_lifespan(engine))
    app.add_middleware(_Observe, metrics=metrics)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(error_body(str(e), e.status, e.code, e.param), status_code=e.status)

    @app.exception_handler(Unusable)
    async def _unusable(request, e: Unusable):
        return JSONResponse(error_body(str(e), e.status), status_code=e.status)

    @app.middleware("http")
    async def _auth(request: HttpRequest, call_next):
        if options.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
                return JSONResponse(error_body("Missing or wrong API key: send 'Authorization: Bearer KEY'.", 401),
                                    status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.counts()}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        store.scan()
        listed = [{"id": options.name, "object": "model", "created": started, "owned_by": "deltatune"}]
        listed += [{"id": f"{options.name}:{d}", "object": "model", "created": started, "owned_by": "deltatune",
                    "parent": options.name, "root": d} for d in store.names()]
        return {"object": "list", "data": listed}

    @app.post("/v1/deltas/reload")
    async def reload():
        return {"deltas": sorted(store.scan())}

    def resolve(model: str) -> str | None:
        """The delta a request's `model` names (None: the base model)."""
        if model == options.name:
            return None
        base, sep, name = model.rpartition(":")
        if sep and base != options.name:
            raise ApiError(404, f"Unknown model {model!r}: this server serves {options.name!r} and its deltas "
                                f"({', '.join(store.names()) or 'none yet'}).", "model_not_found", "model")
        check_name(name)
        if not store.knows(name):
            raise ApiError(404, f"Unknown model or delta {model!r}. Models: {options.name!r}; deltas in "
                                f"{store.root}: {', '.join(store.names()) or 'none'}.", "model_not_found", "model")
        return name

    def sampling(body, prompt_len: int, default_tokens: int | None) -> Sampling:
        limit = body.token_limit() if isinstance(body, ChatRequest) else body.max_tokens
        if limit is None:
            limit = default_tokens or max(1, min(options.max_tokens_cap, options.max_context - prompt_len))
        if limit > options.max_tokens_cap:
            raise ApiError(400, f"max_tokens {limit} is above this server's cap of {options.max_tokens_cap}.",
                           param="max_tokens")
        if prompt_len + limit > options.max_context:
            raise ApiError(400, f"This model's context is {options.max_context} tokens, but the prompt has {prompt_len} "
                                f"and max_tokens asks for {limit} more; shorten the prompt or lower max_tokens.",
                           "context_length_exceeded", "messages" if isinstance(body, ChatRequest) else "prompt")
        if body.min_tokens > limit:
            raise ApiError(400, f"min_tokens {body.min_tokens} is above max_tokens {limit}.", param="min_tokens")
        return Sampling(max_tokens=limit, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                        stop=body.stops(), min_tokens=body.min_tokens)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await _parse(request, CompletionRequest)
        delta = resolve(body.model)
        prompts = [tokenizer(p).input_ids for p in body.prompts()]
        if any(not p for p in prompts):
            raise ApiError(400, "A prompt is empty: give at least one token of text.", param="prompt")
        plans = [sampling(body, len(p), options.default_completion_tokens) for p in prompts]
        pendings = _submit(engine, prompts, delta, plans)
        rid = new_id("cmpl")
        if body.stream:
            return await _stream(request, engine, pendings, options, _completion_events(rid, body))
        results = await _collect(request, engine, pendings, options)
        usage = _sum_usage([r[2] for r in results])
        return completion(rid, body.model, [r[0] for r in results], [r[1] for r in results], usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await _parse(request, ChatRequest)
        delta = resolve(body.model)
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "This model's tokenizer has no chat template: use /v1/completions.", param="messages")
        try:
            text = tokenizer.apply_chat_template([m.for_template() for m in body.messages],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template rejecting the conversation (roles, order)
            raise ApiError(400, f"The chat template cannot format these messages: {e}", param="messages") from None
        ids = tokenizer(text, add_special_tokens=False).input_ids
        pendings = _submit(engine, [ids], delta, [sampling(body, len(ids), None)])
        rid = new_id("chatcmpl")
        if body.stream:
            return await _stream(request, engine, pendings, options, _chat_events(rid, body))
        (text, finish, usage), = await _collect(request, engine, pendings, options)
        return chat(rid, body.model, text, finish, usage)

    return app


def _lifespan(engine: Engine):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish (or timed them out)
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)
    return lifespan


async def _parse(request: HttpRequest, kind):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        body = kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"Invalid request: {where}: {first['msg']} ({e.error_count()} problem(s)).",
                       param=where or None) from None
    problem = body.unsupported()
    if problem:
        raise ApiError(400, problem)
    return body


def _submit(engine: Engine, prompts, delta, plans) -> list[_Pending]:
    loop = asyncio.get_running_loop()
    pendings = []
    for i, (ids, plan) in enumerate(zip(prompts, plans)):
        p = _Pending(loop, i)
        p.request = Request(ids, delta, plan, p.emit)
        pendings.append(p)
    for p in pendings:
        engine.submit(p.request)
    return pendings


class _Watch:
    """A request's deadline and its client: checked every quarter second while events come in."""

    def __init__(self, request: HttpRequest, engine: Engine, pendings, timeout: float):
        self.request, self.engine, self.pendings = request, engine, pendings
        self.deadline = time.monotonic() + timeout
        self.checked = time.monotonic()

    async def next_event(self, queue: asyncio.Queue):
        """The next event from `queue`; cancels the requests if the client left or time ran out."""
        while True:
            if time.monotonic() - self.checked > 0.25:
                await self.check()
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                await self.check()

    async def check(self):
        self.checked = time.monotonic()
        if await self.request.is_disconnected():
            _cancel(self.engine, self.pendings)
            raise ApiError(499, "The client closed the connection.")
        if self.checked > self.deadline:
            _cancel(self.engine, self.pendings)
            raise ApiError(504, "The request took longer than the server's request timeout.")


def _cancel(engine, pendings):
    for p in pendings:
        engine.cancel(p.request)


async def _collect(request, engine, pendings, options) -> list[tuple[str, str, dict]]:
    """(text, finish_reason, usage) of each pending request, in order; an error raises ApiError."""
    watch = _Watch(request, engine, pendings, options.request_timeout)
    results = []
    try:
        for p in pendings:
            texts = []
            while True:
                kind, args = await watch.next_event(p.queue)
                if kind == "text":
                    texts.append(args[0])
                elif kind == "done":
                    results.append(("".join(texts), args[0], args[1]))
                    break
                else:
                    raise ApiError(args[0], args[1])
    except BaseException:
        _cancel(engine, pendings)
        raise
    return results


async def _stream(request, engine, pendings, options, events):
    """A server-sent-event response. The first event is awaited before responding, so a request
    that fails at once (its delta cannot be loaded) gets its 4xx status, not a 200 stream."""
    watch = _Watch(request, engine, pendings, options.request_timeout)
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(p):
        while True:
            kind, args = await p.queue.get()
            await merged.put((p.index, kind, args))
            if kind != "text":
                return

    pumps = [asyncio.ensure_future(pump(p)) for p in pendings]
    try:
        first = await watch.next_event(merged)
    except BaseException:
        for t in pumps:
            t.cancel()
        raise
    if first[1] == "error":
        _cancel(engine, pendings)
        for t in pumps:
            t.cancel()
        raise ApiError(*first[2])

    async def body():
        left, usages, event = len(pendings), [], first
        try:
            yield events.start()
            while True:
                index, kind, args = event
                if kind == "error":
                    yield _sse(error_body(args[1], args[0]))
                    break
                if kind == "done":
                    usages.append(args[1])
                yield events.chunk(index, kind, args)
                if kind == "done":
                    left -= 1
                    if not left:
                        if events.usage:
                            yield _sse(events.usage_chunk(_sum_usage(usages)))
                        break
                try:
                    event = await watch.next_event(merged)
                except ApiError as e:
                    yield _sse(error_body(str(e), e.status))
                    break
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects mid-stream: its rows leave the batch
            _cancel(engine, pendings)
            for t in pumps:
                t.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _completion_events:
    def __init__(self, rid, body):
        self.rid, self.model, self.usage = rid, body.model, body.include_usage()

    def start(self) -> str:
        return ""

    def chunk(self, index, kind, args) -> str:
        if kind == "text":
            return _sse(completion_chunk(self.rid, self.model, index, args[0]))
        return _sse(completion_chunk(self.rid, self.model, index, "", args[0]))

    def usage_chunk(self, usage):
        return usage_chunk(self.rid, self.model, "text_completion", usage)


class _chat_events(_completion_events):
    def start(self) -> str:
        return _sse(chat_chunk(self.rid, self.model, {"role": "assistant", "content": ""}))

    def chunk(self, index, kind, args) -> str:
        if kind == "text":
            return _sse(chat_chunk(self.rid, self.model, {"content": args[0]}))
        return _sse(chat_chunk(self.rid, self.model, {}, args[0]))

    def usage_chunk(self, usage):
        return usage_chunk(self.rid, self.model, "chat.completion.chunk", usage)


def _sum_usage(usages: list[dict]) -> dict:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: sum(u.get(k, 0) for u in usages) for k in keys}


class _Observe:
    """ASGI middleware: counts each response by path and status and times it to its last byte
    (a stream's end, not its start)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]

        async def observed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                self.metrics.observe(scope["path"], status[0], time.monotonic() - start)
            await send(message)

        await self.app(scope, receive, observed)
