"""`tierstore serve`: an OpenAI-compatible HTTP API over one model, on FastAPI and uvicorn.

POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), GET /v1/models and /health.
Every request becomes a sequence in the Batcher, so one weight pass serves all of them. Errors have OpenAI's body,
{"error": {"message", "type", "param", "code"}}: 400 for bad input, 401 without the API key, 429 when the wait
queue is full, 503 while shutting down.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ...errors import InputError
from ..placement.kv import kv_cache_tokens, largest_batch
from .batcher import Batcher, Event, QueueFull, SamplingParams, ShuttingDown
from .generate import GenerateRequest, open_model
from .text import check_text

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions' default max_tokens, as OpenAI's; chat runs to the context


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    """A chat message; content as text or as OpenAI's list of parts (the text parts are used)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class Sampling(BaseModel):
    """The fields both endpoints take. temperature 0 is greedy; OpenAI's defaults otherwise."""

    model_config = ConfigDict(extra="allow")  # clients send fields this server ignores (user, logprobs, ...)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


@dataclasses.dataclass(frozen=True)
class Served:
    """What the app serves, kept on `app.state`: the model, the batcher every request joins, the model id clients
    send, and the API key /v1/ requires (None: none)."""

    model: Any
    batcher: Batcher
    name: str
    api_key: str | None = None


def create_app(model: Any, batcher: Batcher, model_name: str, api_key: str | None = None,
               on_start: Callable[[], None] | None = None, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving `model` (a TierstoreModel) through `batcher` under the id `model_name`.
    `on_start` runs as the server starts; `on_shutdown` (in a worker thread) once it has stopped taking requests."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if on_start is not None:
            on_start()
        yield
        if on_shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, on_shutdown)

    app = FastAPI(title="tierstore", lifespan=lifespan)
    app.state.served = Served(model, batcher, model_name, api_key)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.middleware("http")(check_key)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    return app


def _served(request: Request) -> Served:
    return request.app.state.served


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, or a field out of range: 400 naming the field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return JSONResponse(APIError(400, f"the request body is not valid JSON: {reason}").body(), status_code=400)
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"{where}: {first.get('msg')}" if where else \
        f"the request body must be a JSON object sent as application/json ({first.get('msg')})"
    return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)


async def check_key(request: Request, call_next: Any) -> Any:
    """401 for /v1/ without the API key, when the server has one."""
    api_key = _served(request).api_key
    if api_key is not None and request.url.path.startswith("/v1/"):
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             kind="authentication_error", code="invalid_api_key")
            return JSONResponse(error.body(), status_code=401)
    return await call_next(request)


async def health(request: Request) -> dict[str, Any]:
    served = _served(request)
    return {"status": "ok", "model": served.name, **served.batcher.counts(), "passes": served.batcher.steps,
            "tokens": served.batcher.tokens_generated}


async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": _served(request).name, "object": "model", "created": 0,
                                        "owned_by": "tierstore"}]}


async def chat(body: ChatRequest, request: Request) -> Any:
    served = _served(request)
    _check_served(served, body)
    prompt_ids = _chat_ids(served.model.tokenizer, [m.model_dump() for m in body.messages])
    limit = body.max_completion_tokens or body.max_tokens
    return await _complete(served, request, body, prompt_ids, limit, chat=True)


async def completions(body: CompletionRequest, request: Request) -> Any:
    served = _served(request)
    _check_served(served, body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "give one prompt per request (a list of several is not supported)", param="prompt")
    if not prompts[0]:
        raise APIError(400, "the prompt is empty", param="prompt")
    _check_text(prompts[0], "prompt")
    prompt_ids = served.model.tokenizer(prompts[0]).input_ids
    return await _complete(served, request, body, prompt_ids, body.max_tokens or DEFAULT_COMPLETION_TOKENS,
                           chat=False)


def _check_served(served: Served, body: Sampling) -> None:
    """What the request asks of this server, checked before its prompt is tokenized."""
    if body.model != served.name:
        raise APIError(400, f"model {body.model!r} is not served here; this server serves {served.name!r}",
                       code="model_not_found", param="model")
    if body.n != 1:
        raise APIError(400, f"n={body.n}: only n=1 is supported", param="n")


async def _complete(served: Served, request: Request, body: Any, prompt_ids: list[int], max_tokens: int | None,
                    chat: bool) -> Any:
    """The request as a sequence of the batch; its reply streamed, or whole once it ends."""
    batcher = served.batcher
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(max_tokens=max_tokens or max(batcher.max_seq_tokens - len(prompt_ids), 1),
                            temperature=body.temperature, top_p=body.top_p, stop=stops, seed=body.seed)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        sequence = batcher.submit(prompt_ids, params,
                                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    except InputError as exc:
        raise APIError(400, str(exc), param="max_tokens" if "max_tokens" in str(exc) else None) from None
    except QueueFull as exc:
        raise APIError(429, f"too many requests waiting ({exc}); retry later", kind="rate_limit_error",
                       code="queue_full") from None
    except ShuttingDown as exc:
        raise APIError(503, str(exc), kind="server_error", code="shutting_down") from None
    reply = _Reply(chat, served.name)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(batcher, sequence, events, reply, include_usage),
                                 media_type="text/event-stream")
    return await _whole(batcher, request, sequence, events, reply)


async def _whole(batcher: Batcher, request: Request, sequence: Any, events: asyncio.Queue[Event],
                 reply: _Reply) -> Any:
    """The whole reply once the sequence ends; None (and the sequence cancelled) if the client went away."""
    parts: list[str] = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None  # the finally below cancels the sequence
                continue
            parts.append(event.text)
            if event.finish_reason is not None:
                break
    finally:
        batcher.cancel(sequence)
    if event.finish_reason == "error":
        raise APIError(500, f"generation failed: {event.error}", kind="server_error")
    return reply.whole("".join(parts), event)


async def _stream(batcher: Batcher, sequence: Any, events: asyncio.Queue[Event], reply: _Reply,
                  include_usage: bool) -> AsyncIterator[str]:
    """The reply as server-sent events, as OpenAI sends them."""
    try:
        if reply.chat:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}, None))
        while True:
            event = await events.get()
            if event.finish_reason == "error":
                yield _sse(APIError(500, f"generation failed: {event.error}", kind="server_error").body())
                break
            if event.text or event.finish_reason:
                yield _sse(reply.chunk({"content": event.text} if reply.chat else event.text, event.finish_reason))
            if event.finish_reason is not None:
                if include_usage:
                    yield _sse({**reply.chunk(None, None), "choices": [], "usage": _usage(event)})
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: the sequence leaves the batch and frees its cache rows
        batcher.cancel(sequence)


class _Reply:
    """OpenAI's response objects for one request."""

    def __init__(self, chat: bool, model_name: str) -> None:
        self.chat, self.model_name = chat, model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def chunk(self, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta, "logprobs": None}
        return {**self._head(chunk=True), "choices": [{**choice, "finish_reason": finish_reason}]}

    def whole(self, text: str, last: Event) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if self.chat else \
            {"index": 0, "text": text, "logprobs": None}
        return {**self._head(chunk=False), "choices": [{**choice, "finish_reason": last.finish_reason}],
                "usage": _usage(last)}


def _usage(last: Event) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _check_text(text: str, param: str) -> None:
    """400 naming the field when its text is not valid Unicode."""
    try:
        check_text(text, param)
    except InputError as exc:
        raise APIError(400, str(exc), param=param.split("[")[0]) from None


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The chat's token ids through the model's own chat template (text parts of a message joined)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        elif content is None:
            message["content"] = ""
    if not any(message["content"].strip() for message in messages):
        raise APIError(400, "the messages hold no text", param="messages")
    for index, message in enumerate(messages):
        _check_text(message["content"], f"messages[{index}].content")
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How `tierstore serve` serves: the address, the API key (None: none), the model id clients send (None: the
    model as given), and the batch's bounds: sequences per pass, requests waiting, tokens per sequence."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    max_seq_len: int = 4096
    grace_s: float = 30.0  # how long requests in flight may finish after SIGTERM


def serve(request: GenerateRequest, options: ServeOptions, say: Callable[[str], None]) -> None:
    """Open the request's model, size the batch to the budget, make one pass so that the first client does not
    wait for the disk, then serve until SIGTERM (returns) or Ctrl-C (KeyboardInterrupt). Bad options and a port in
    use are refused before the model is opened. `say` gets the start-up lines."""
    if request.draft:
        raise InputError("--draft speculates for one sequence; serve batches many sequences per pass instead")
    for option in ("max_batch", "max_queue", "max_seq_len"):
        if getattr(options, option) < 1:
            raise InputError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(options, option)}")
    _check_port_free(options.host, options.port)  # before minutes of loading, not after
    name = options.served_model_name or request.model
    with open_model(request) as model:
        max_seq = min(options.max_seq_len, model.max_context or options.max_seq_len)
        batch, notes = largest_batch(model, options.max_batch, max_seq)
        for line in notes:
            say(line)
        say(f"weights in place after a first pass of {model.warm_up():.1f} s")
        shorter = "" if batch == options.max_batch else f", up to {options.max_batch} of shorter ones"
        where = "; the KV cache in host RAM" if model.kv_on_host else ""
        ready = (f"serving {name} at http://{options.host}:{options.port}/v1, up to {batch} sequences of {max_seq} "
                 f"tokens per pass{shorter}{where}")
        _run(model, name, options, max_seq, kv_cache_tokens(batch, max_seq), say, ready)


def _check_port_free(host: str, port: int) -> None:
    """One line naming the address when it cannot be bound."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _run(model: Any, name: str, options: ServeOptions, max_seq_tokens: int, cache_tokens: int,
         say: Callable[[str], None], ready: str) -> None:
    """Serve an opened model until SIGTERM or Ctrl-C, saying how its batches decode and then `ready` once it
    listens. On SIGTERM: stop accepting, let what is in flight finish for up to `options.grace_s`, cancel the rest,
    and return; Ctrl-C after the same shutdown raises KeyboardInterrupt."""
    batcher = Batcher(model, max_batch=options.max_batch, max_queue=options.max_queue, max_seq_tokens=max_seq_tokens,
                      cache_tokens=cache_tokens)
    if batcher.steps_note:
        say(batcher.steps_note)
    app = create_app(model, batcher, name, options.api_key, lambda: say(ready),
                     on_shutdown=lambda: batcher.close(options.grace_s))
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=options.grace_s)
    server = uvicorn.Server(config)
    # uvicorn raises the signal again once it has shut down; a handled SIGTERM must then end the process with 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        batcher.close(0)
