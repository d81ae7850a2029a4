"""An OpenAI-compatible HTTP server: one 4-bit base, many LoRA adapters, every request traced.

FastAPI + uvicorn in front of `engine.Engine`. The routes are OpenAI's (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`, streaming as server-sent events in its chunk format) plus vLLM's runtime adapter routes
(`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), so existing clients point at it unchanged; `model` names an
adapter or the base. Every failure a client can cause is a 4xx in OpenAI's error shape naming the field, and the
server goes on serving. Requests are tokenized here, on the event loop, with a tokenizer of their own: the engine
thread decodes with its copy, and a fast tokenizer must not be used from two threads at once.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from qlora_kit.adapters import read_chat_template
from qlora_kit.data import render_prompt
from qlora_kit.engine import CANCELLED, Delta, Engine, Failed, Finished, Sampling, Sequence
from qlora_kit.errors import DataError
from qlora_kit.traces import TraceLog

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)


class ApiError(Exception):
    """A request the server refuses: becomes {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# ---- request bodies: strict types (a string is not a number), unknown fields ignored as OpenAI's API does ----

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension (clients send it in extra_body)


class CompletionBody(_Generation):
    prompt: str | list[str] = Field(min_length=1)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatBody(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadBody(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadBody(_Strict):
    lora_name: str = Field(min_length=1)


# ---- one completion request in flight -----------------------------------------------------------------------

@dataclass
class _Call:
    """The sequences of one request (prompts × n) and the events they send back to the event loop."""

    kind: Literal["text_completion", "chat.completion"]
    model: str
    adapter: str | None
    prompts: list[str]
    prompt_tokens: int
    started: float
    on_complete: Callable[[_Call], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seqs: list[Sequence] = field(default_factory=list)
    done: dict[int, Finished] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)

    def deliver(self, index: int, event: Delta | Finished | Failed) -> None:
        """On the event loop, for every engine event; the last choice to end completes the call (traced even
        when its client has gone)."""
        if isinstance(event, Finished):
            self.done[index] = event
        elif isinstance(event, Failed):
            self.failed[index] = event.message
        self.queue.put_nowait((index, event))
        if not isinstance(event, Delta) and len(self.done) + len(self.failed) == len(self.seqs):
            self.on_complete(self)

    async def events(self) -> AsyncIterator[tuple[int, Delta | Finished]]:
        """(choice index, event) until every choice has finished; a failed choice cancels the rest."""
        pending = len(self.seqs)
        while pending:
            index, event = await self.queue.get()
            if isinstance(event, Failed):
                self.cancel()
                raise ApiError(500, event.message, kind="server_error")
            pending -= isinstance(event, Finished)
            yield index, event

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    async def watch_disconnect(self, request: Request) -> None:
        """Cancel every choice when the client goes away: its rows leave the batch at the next step."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()

    def usage(self) -> dict:
        completion = sum(f.completion_tokens for f in self.done.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def chunk(self, choices: list[dict], **extra) -> dict:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else self.kind
        return {"id": self._full_id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def choice(self, index: int, text: str, finish: str | None, stream: bool) -> dict:
        if self.kind == "text_completion":
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        key, body = ("delta", {"content": text} if text or finish is None else {}) if stream else \
            ("message", {"role": "assistant", "content": text})
        return {"index": index, key: body, "logprobs": None, "finish_reason": finish}

    @property
    def _full_id(self) -> str:
        return ("cmpl-" if self.kind == "text_completion" else "chatcmpl-") + self.id


# ---- the app -------------------------------------------------------------------------------------------------

class Server:
    """Routes over one engine; `base` is the id clients use for the bare base model."""

    def __init__(self, engine: Engine, base: str, *, root: str, traces: TraceLog | None = None) -> None:
        self.engine, self.base, self.root, self.traces = engine, base, root, traces
        self.tokenizer = copy.deepcopy(engine.tokenizer)

    def resolve(self, model: str) -> str | None:
        """The adapter `model` names (None: the base), or 404 naming what is served."""
        if model in (self.base, self.root):
            return None
        adapters = self.engine.adapters()
        if model in adapters:
            return model
        served = ", ".join([self.base, *adapters])
        raise ApiError(404, f"The model {model!r} does not exist; this server has: {served}", "model",
                       "model_not_found")

    def models(self) -> dict:
        created = int(time.time())
        rows = [{"id": self.base, "object": "model", "created": created, "owned_by": "qlora-kit", "root": self.root,
                 "parent": None}]
        rows += [{"id": name, "object": "model", "created": created, "owned_by": "qlora-kit", "root": str(path),
                  "parent": self.base} for name, path in self.engine.adapters().items()]
        return {"object": "list", "data": rows}

    async def complete(self, body: CompletionBody, request: Request) -> object:
        started = time.perf_counter()
        adapter = self.resolve(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        encoded = [self._encode(p, chat=False, param="prompt") for p in prompts]
        call = _Call("text_completion", body.model, adapter, prompts, sum(map(len, encoded)), started, self._trace)
        return await self._run(call, body, encoded, body.max_tokens or DEFAULT_COMPLETION_TOKENS, request)

    async def chat(self, body: ChatBody, request: Request) -> object:
        started = time.perf_counter()
        adapter = self.resolve(body.model)
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        path = self.engine.adapters().get(adapter) if adapter is not None else None
        try:  # the template the adapter was trained with (as `qlora-kit generate` renders), else the tokenizer's
            template = read_chat_template(path) if path is not None else None
            prompt, _ = render_prompt(self.tokenizer, {"messages": messages}, template, where="messages")
        except (DataError, ValueError, TypeError) as e:  # no chat template, or one that refuses these roles
            raise ApiError(400, f"messages: cannot apply the chat template ({e}); use /v1/completions",
                           "messages") from None
        ids = self._encode(prompt, chat=True, param="messages")
        call = _Call("chat.completion", body.model, adapter, [prompt], len(ids), started, self._trace)
        limit = body.max_completion_tokens or body.max_tokens
        return await self._run(call, body, [ids], limit or self.engine.context - len(ids), request)

    def _encode(self, text: str, *, chat: bool, param: str) -> list[int]:
        # A chat template already wrote the BOS; a plain prompt needs the tokenizer's (as `qlora-kit generate`).
        ids = self.tokenizer(text, add_special_tokens=not chat)["input_ids"]
        if not ids:
            raise ApiError(400, f"{param}: empty prompt", param)
        if len(ids) >= self.engine.context:
            raise ApiError(400, f"{param}: the prompt is {len(ids)} tokens; this model's context is "
                           f"{self.engine.context} tokens, which must also hold the completion", param,
                           "context_length_exceeded")
        return ids

    async def _run(self, call: _Call, body: _Generation, encoded: list[list[int]], max_tokens: int,
                   request: Request) -> object:
        longest = max(map(len, encoded))
        if longest + max_tokens > self.engine.context:
            raise ApiError(400, f"max_tokens: {max_tokens} completion tokens after a {longest}-token prompt exceed "
                           f"this model's context of {self.engine.context} tokens", "max_tokens",
                           "context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        loop = asyncio.get_running_loop()
        for i, ids in enumerate(x for x in encoded for _ in range(body.n)):
            seed = None if body.seed is None else body.seed + i % body.n  # n choices: n streams, reproducible
            sampling = Sampling(max_tokens, 1.0 if body.temperature is None else body.temperature,
                                1.0 if body.top_p is None else body.top_p, stop, seed, body.ignore_eos)
            sink = lambda event, i=i: loop.call_soon_threadsafe(call.deliver, i, event)  # noqa: E731
            call.seqs.append(Sequence(ids, call.adapter, sampling, sink, submitted=call.started))
        try:
            for seq in call.seqs:
                self.engine.submit(seq)
        except Exception as e:  # shutting down
            call.cancel()
            raise ApiError(503, str(e), kind="server_error") from None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(call, request, usage), media_type="text/event-stream")
        watcher = asyncio.create_task(call.watch_disconnect(request))
        try:
            async for _ in call.events():
                pass
        finally:
            watcher.cancel()
            call.cancel()  # a no-op once all are done; frees the rows if this handler was cancelled
        choices = [call.choice(i, done.text, done.reason, stream=False) for i, done in sorted(call.done.items())]
        return {**call.chunk(choices), "object": call.kind, "usage": call.usage()}

    async def _stream(self, call: _Call, request: Request, usage: bool) -> AsyncIterator[str]:
        watcher = asyncio.create_task(call.watch_disconnect(request))
        try:
            if call.kind == "chat.completion":
                first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(call.seqs))]
                yield _sse(call.chunk(first))
            async for index, event in call.events():
                if isinstance(event, Delta):
                    yield _sse(call.chunk([call.choice(index, event.text, None, stream=True)]))
                elif event.reason != CANCELLED:
                    yield _sse(call.chunk([call.choice(index, "", event.reason, stream=True)]))
            if usage:
                yield _sse(call.chunk([], usage=call.usage()))
        except ApiError as e:
            yield _sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
        finally:
            watcher.cancel()
            call.cancel()  # a client gone mid-stream: its rows leave the batch at the next step
        yield "data: [DONE]\n\n"

    def _trace(self, call: _Call) -> None:
        if self.traces is None:
            return
        done = list(call.done.values())
        reasons = {d.reason for d in done} | ({"error"} if call.failed else set())
        latency = time.perf_counter() - call.started
        completion = sum(d.completion_tokens for d in done)
        ttfts = [d.ttft_s for d in done if d.ttft_s is not None]
        record = {
            "id": call._full_id, "endpoint": call.kind, "model": call.model, "adapter": call.adapter,
            "prompt_tokens": call.prompt_tokens, "completion_tokens": completion,
            "queue_s": max((d.queue_s for d in done), default=None), "ttft_s": min(ttfts, default=None),
            "latency_s": latency, "tokens_per_s": completion / latency,
            "finish_reason": ",".join(sorted(reasons)), "choices": len(call.seqs),
        }
        texts = {"prompt": call.prompts if len(call.prompts) > 1 else call.prompts[0],
                 "completion": [call.done[i].text if i in call.done else None for i in range(len(call.seqs))]}
        self.traces.write(record, texts, started=call.started)


def _text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _param(loc: tuple) -> str | None:
    """The request field a validation error is about: `messages[0].content`, not FastAPI's ('body', ...)."""
    parts = [p for p in loc[1:] if isinstance(p, int) or (isinstance(p, str) and p.isidentifier()
                                                            and p not in ("str", "int", "float", "bool", "list"))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or None


class _ApiKey:
    """Plain ASGI middleware: every HTTP request must carry `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "Incorrect API key provided; send it as 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(server: Server, api_key: str | None = None) -> FastAPI:
    """The ASGI app; its lifespan starts the engine and, at shutdown (after uvicorn drained the in-flight
    requests), stops it."""
    @asynccontextmanager
    async def lifespan(_app):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)
            if server.traces is not None:
                server.traces.close()

    app = FastAPI(title="qlora-kit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        app.add_middleware(_ApiKey, key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            detail = first.get("ctx", {}).get("error", first["msg"])
            return ApiError(400, f"malformed JSON in the request body ({detail})", None, "invalid_json").response()
        param = _param(tuple(first["loc"]))
        return ApiError(400, f"{param or 'body'}: {first['msg']}", param, first["type"]).response()

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail)).response()

    app.get("/health")(lambda: {})
    app.get("/v1/models")(server.models)
    app.post("/v1/completions")(server.complete)
    app.post("/v1/chat/completions")(server.chat)

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadBody):
        if body.lora_name == server.base:
            raise ApiError(400, f"lora_name: {body.lora_name!r} is the base model's name", "lora_name")
        try:
            await asyncio.wrap_future(server.engine.register(body.lora_name, Path(body.lora_path)))
        except Exception as e:  # refused with the reason; the adapters already held keep serving
            param = "lora_name" if body.lora_name in server.engine.adapters() else "lora_path"
            raise ApiError(400, f"{param}: {e}", param) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadBody):
        loaded = server.engine.adapters()
        if body.lora_name not in loaded:
            raise ApiError(404, f"lora_name: no adapter named {body.lora_name!r}; loaded: "
                           f"{', '.join(loaded) or 'none'}", "lora_name", "model_not_found")
        await asyncio.wrap_future(server.engine.unregister(body.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def serve(model_dir: str | Path, adapters: dict[str, Path], *, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 16, max_adapters: int = 8, trace: Path | None = None, trace_text: bool = False,
          api_key: str | None = None, dtype: str = "bfloat16", device: str | None = None) -> None:
    """The CLI's job: load the base once, register the adapters (each must load), serve until Ctrl-C/SIGTERM,
    which stops accepting, finishes the requests in flight and exits."""
    import uvicorn

    from qlora_kit.device import load_tokenizer, resolve_device, resolve_dtype
    from qlora_kit.errors import ConfigError
    from qlora_kit.loader import load_quantized

    if len(adapters) > max_adapters:
        log.warning("%d adapters, --max-adapters %d: the least recently used are reloaded on demand",
                    len(adapters), max_adapters)
    where = resolve_device(device)
    model = load_quantized(model_dir, device=where, dtype=resolve_dtype(dtype, where))
    engine = Engine(model, load_tokenizer(model_dir), max_batch=max_batch, max_adapters=max_adapters)
    base = Path(model_dir).resolve().name
    for name, path in adapters.items():
        if name == base:
            raise ConfigError(f"--adapter {name}=...: {name!r} is the base model's name; pick another")
        engine.register(name, path).result()
    traces = TraceLog(trace, with_text=trace_text) if trace else None
    app = build_app(Server(engine, base, root=str(model_dir), traces=traces), api_key)
    print(f"serving {base} and {len(adapters)} adapter(s) on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None)
