"""`hemat serve`: an OpenAI-compatible HTTP server and web chat over the engine's continuous batching.

The server only translates HTTP to Engine calls: it validates (protocol.py), admits through a bounded
queue (429 with Retry-After when full), submits to the engine, and bridges the engine's scheduler-thread
events to asyncio. A client that goes away cancels its generation, which frees its cache pages.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health,
GET /metrics, and the web chat at / (with /static/*). With an API key, everything but /health and the
web page's files needs `Authorization: Bearer KEY`. Chat requests may carry tools (function calling:
tools.py); both routes take output constraints (response_format, guided_json/regex/choice/grammar:
infer/constraints.py); /v1/completions with echo returns the prompt and its logprobs (lm-eval)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from hemat.errors import HematError
from hemat.infer.quantize import add_quantize_arguments, load_for_inference
from hemat.infer.cli import draft_tokens_arg
from hemat.infer.sampling import SamplingParams
from hemat.model.hub import is_hub_id, resolve_model_source
from hemat.serve.auth import ApiKeyMiddleware, BodyLimitMiddleware
from hemat.serve.bridge import Admission, EventStreamResponse, Generation, QueueFull, sse
from hemat.serve.metrics import RequestCounterMiddleware, ServerMetrics
from hemat.infer.constraints import Guide
from hemat.serve.protocol import (
    APIError, ChatCompletionRequest, CompletionRequest, chat_logprobs, completion_logprobs,
    describe_validation_error, document_errors, error_body, usage,
)
from hemat.serve.tools import ToolStream, ToolSyntax, check_tools, forced_functions, syntax_for

log = logging.getLogger("hemat.serve")
STATIC_DIR = Path(__file__).parent / "static"
API_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


@dataclass
class ServeSettings:
    served_model_name: str = "hemat"
    api_key: str | None = None
    max_concurrent: int = 32  # requests generating at once
    max_queue: int = 128  # requests waiting for a slot; beyond this, 429
    price_input: float = 0.0  # USD per million prompt tokens
    price_output: float = 0.0  # USD per million completion tokens
    max_body_bytes: int = 4 * 1024 * 1024
    log_prompts: bool = False

    def validate(self) -> None:
        for name in ("max_concurrent", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise HematError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_queue", "price_input", "price_output"):
            if getattr(self, name) < 0:
                raise HematError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.served_model_name:
            raise HematError("served_model_name must not be empty")


# ---- the app --------------------------------------------------------------------------------------------
def create_app(engine, tokenizer, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app. Its lifespan starts the engine's scheduler thread and stops it on shutdown."""
    settings = settings or ServeSettings()
    settings.validate()
    adapters = list(engine.adapters.index) if engine.adapters is not None else []
    if settings.served_model_name in adapters:
        raise HematError(f"the LoRA adapter name {settings.served_model_name!r} is the base model's served name; "
                         "give the adapter another name (or the base another --served-model-name)")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            app.state.draining = True
            engine.stop()

    app = FastAPI(title="hemat", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="OpenAI-compatible API over hemat's inference engine.")
    state = app.state
    state.engine, state.tokenizer, state.settings = engine, tokenizer, settings
    state.model_ids = [settings.served_model_name, *adapters]
    state.metrics = ServerMetrics(engine.stats)
    state.admission = Admission(settings.max_concurrent, settings.max_queue)
    state.draining = False
    state.created = int(time.time())
    _add_error_handlers(app)
    _add_routes(app)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = document_errors(schema, auth=settings.api_key is not None)
        return app.openapi_schema

    app.openapi = openapi
    # the last added runs first: count every response, check the key, then read the (bounded) body
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(RequestCounterMiddleware, metrics=state.metrics, routes=API_ROUTES)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        message, param = describe_validation_error(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message, code = {404: (f"no route {request.method} {request.url.path}", "not_found"),
                         405: (f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"),
                         }.get(exc.status_code, (str(exc.detail), None))
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def _add_routes(app: FastAPI) -> None:
    state = app.state
    settings: ServeSettings = state.settings
    engine = state.engine

    @app.get("/health", summary="200 when the model is loaded and the engine is running")
    async def health():
        if state.draining or not engine.background:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "model": settings.served_model_name}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(model_id: str) -> dict:
        card = {"id": model_id, "object": "model", "created": state.created,
                "owned_by": "hemat", "max_model_len": engine.max_context,
                "weight_format": engine.model.weight_format, "weight_bytes": engine.model.weight_bytes}
        if model_id != settings.served_model_name:  # a LoRA adapter over the base (vLLM's field)
            card["parent"] = settings.served_model_name
        return card

    @app.get("/v1/models", summary="the served model and its LoRA adapters")
    async def list_models():
        return {"object": "list", "data": [model_card(m) for m in state.model_ids]}

    @app.get("/v1/models/{model_id:path}", summary="one model by id")
    async def get_model(model_id: str):
        _check_model(state, model_id)
        return model_card(model_id)

    @app.post("/v1/chat/completions", summary="chat completion (OpenAI format, with reasoning_content)")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        adapter = _check_model(state, body.model)
        tools = body.active_tools()
        syntax = syntax_for(state.tokenizer.chat_template) if tools else None
        guide = body.guide()
        if tools:
            check_tools(tools)
            forced = forced_functions(tools, body.tool_choice)
            if forced and guide is not None:
                raise APIError(400, f"tool_choice: a forced tool call cannot also follow {guide.where}",
                               param="tool_choice")
            if forced:
                guide = Guide("grammar", syntax.grammar(forced), "tool_choice")
        params = _sampling_params(body.sampling_kwargs(), max_tokens=body.token_limit(), logprobs=body.logprobs,
                                  top_logprobs=body.top_logprobs or 0, guide=guide,
                                  skip_special_tokens=not tools)  # call markers may be special tokens
        submission = {"messages": body.template_messages(), "params": params, "tools": tools, "adapter": adapter}
        gen = await _start(state, [submission], body.n)
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        if settings.log_prompts:
            log.info("%s messages: %s", rid, json.dumps(submission["messages"], ensure_ascii=False))
        calls = _ToolCalls(syntax, {t["function"]["name"] for t in tools}, body.parallel_tool_calls) if tools else None
        if body.stream:
            return EventStreamResponse(_stream_chat(state, gen, body, rid, calls), on_close=gen.close)
        return await _until_done_or_gone(request, gen, _complete_chat(state, gen, body, rid, calls))

    @app.post("/v1/completions", summary="text completion (OpenAI's legacy format)")
    async def completions(body: CompletionRequest, request: Request):
        adapter = _check_model(state, body.model)
        top = body.logprobs or 0
        prompt_logprobs = top if body.echo and body.logprobs is not None else None
        params = _sampling_params(body.sampling_kwargs(), max_tokens=body.max_tokens,
                                  logprobs=body.logprobs is not None, top_logprobs=top,
                                  prompt_logprobs=prompt_logprobs, guide=body.guide())
        submissions = [
            {"prompt" if isinstance(p, str) else "prompt_ids": p, "params": params, "adapter": adapter}
            for p in body.prompts()
        ]
        gen = await _start(state, submissions, body.n)
        rid = f"cmpl-{secrets.token_hex(12)}"
        if settings.log_prompts:
            log.info("%s prompt: %s", rid, json.dumps(body.prompt, ensure_ascii=False))
        if body.stream:
            return EventStreamResponse(_stream_completion(state, gen, body, rid), on_close=gen.close)
        return await _until_done_or_gone(request, gen, _complete_text(state, gen, body, rid))

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _check_model(state, model: str) -> str | None:
    """404 for a model id the server does not serve (as OpenAI answers); → the LoRA adapter's name, or
    None for the base model."""
    if model not in state.model_ids:
        served = ", ".join(f"`{m}`" for m in state.model_ids)
        raise APIError(404, f"The model `{model}` does not exist; this server serves {served}",
                       param="model", code="model_not_found")
    return None if model == state.settings.served_model_name else model


def _sampling_params(common: dict, **specific) -> SamplingParams:
    try:
        return SamplingParams(**common, **specific)
    except HematError as e:  # pydantic checked the ranges; this catches whatever the sampler adds
        raise APIError(400, str(e)) from None


async def _start(state, submissions: list[dict], n: int) -> Generation:
    """Admit (or refuse with 429/503) and submit to the engine (400 for what the engine refuses)."""
    if state.draining:
        raise APIError(503, "the server is shutting down", "server_error", code="shutting_down",
                       headers={"Retry-After": "5"})
    admission: Admission = state.admission
    try:
        state.metrics.queue_depth.inc()
        await admission.acquire()
    except QueueFull:
        raise APIError(429, f"the server is busy: {admission.running} requests are running and "
                       f"{len(admission.waiters)} are queued; retry later", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    finally:
        state.metrics.queue_depth.dec()
    state.metrics.running.set(admission.running)
    try:
        return Generation(state, submissions, n)
    except HematError as e:  # context overflow, ids out of range, a chat template that refuses the roles
        admission.release()
        raise APIError(400, str(e), param=_param_of(str(e))) from None
    except BaseException:
        admission.release()
        raise


def _param_of(message: str) -> str | None:
    if message.startswith(("response_format", "guided_", "tools", "tool_choice")):
        return message.split(":")[0].split(".")[0]
    if message.startswith(("max_tokens", "the request (")):
        return "max_tokens"
    if message.startswith(("the prompt", "prompt_ids")):
        return "prompt"
    return None


async def _until_done_or_gone(request: Request, gen: Generation, work):
    """Run a non-streaming request's work unless the client disconnects first (then cancel it)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, metrics do
    finally:
        watcher.cancel()
        gen.close()


# ---- chat -----------------------------------------------------------------------------------------------
def _reasoning_tokens(tokenizer, output) -> int:
    """Tokens up to and including the end-of-reasoning marker (all of them when it never came)."""
    ids = output.token_ids
    if not output.reasoning_text and not (ids and ids[0] == tokenizer.think_start_id):
        return 0
    end = tokenizer.think_end_id
    return ids.index(end) + 1 if end is not None and end in ids else len(ids)


def _usage(state, results: list, reasoning_tokens: int) -> dict:
    prompt = sum(len(r.prompt_token_ids) for r in results)
    completion = sum(len(o.token_ids) for r in results for o in r.outputs)
    cached = sum(r.cached_tokens for r in results)
    s: ServeSettings = state.settings
    out = usage(prompt, completion, cached, reasoning_tokens, s.price_input, s.price_output)
    m = state.metrics
    m.prompt_tokens.inc(prompt)
    m.cached_tokens.inc(cached)
    m.completion_tokens.inc(completion)
    m.cost_usd.inc(out["cost"]["total_usd"])
    return out


def _log_done(state, rid: str, results: list, texts: list[str]) -> None:
    outputs = [o for r in results for o in r.outputs]
    log.info("%s done: %d prompt + %d completion tokens, finish %s", rid,
             sum(len(r.prompt_token_ids) for r in results), sum(len(o.token_ids) for o in outputs),
             ",".join(str(o.finish_reason) for o in outputs))
    if state.settings.log_prompts:
        log.info("%s output: %s", rid, json.dumps(texts, ensure_ascii=False))


def _failure(gen: Generation, finish_reason: str) -> APIError:
    if finish_reason == "cancelled":
        return APIError(503, "the generation was cancelled (the server is shutting down)", "server_error",
                        code="cancelled")
    return APIError(500, f"generation failed: {gen.error_message()}", "server_error", code="generation_error")


@dataclass
class _ToolCalls:
    syntax: ToolSyntax
    names: set[str]
    parallel: bool  # parallel_tool_calls false: only the first call is returned

    def keep(self, calls: list) -> list:
        return calls if self.parallel else calls[:1]


async def _complete_chat(state, gen: Generation, body: ChatCompletionRequest, rid: str, tools: _ToolCalls | None):
    async for _, event in gen.events():
        if event.finish_reason in ("error", "cancelled"):
            raise _failure(gen, event.finish_reason)
    results = await gen.results()
    outputs = [o for r in results for o in r.outputs]
    choices = []
    for o in outputs:
        message = {"role": "assistant", "content": o.text, "reasoning_content": o.reasoning_text or None}
        finish = o.finish_reason
        content, calls = tools.syntax.parse(o.text, tools.names) if tools else (o.text, [])
        if calls:
            message.update(content=content or None, tool_calls=[c.openai() for c in tools.keep(calls)])
            finish = "tool_calls"
        logprobs = {"content": chat_logprobs(o.logprobs)} if body.logprobs else None
        choices.append({"index": o.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    reasoning = sum(_reasoning_tokens(state.tokenizer, o) for o in outputs)
    _log_done(state, rid, results, [o.text for o in outputs])
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "system_fingerprint": None, "choices": choices, "usage": _usage(state, results, reasoning)}


async def _stream_chat(state, gen: Generation, body: ChatCompletionRequest, rid: str, tools: _ToolCalls | None):
    created = int(time.time())
    include_usage = body.include_usage()
    held = {i: ToolStream(tools.syntax, tools.names) for i in range(body.n)} if tools else {}

    def chunk(choices: list, **extra) -> str:
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
               "system_fingerprint": None, "choices": choices, **extra}
        if include_usage:
            out.setdefault("usage", None)
        return sse(out)

    try:
        for i in range(body.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for index, event in gen.events():
            if event.finish_reason in ("error", "cancelled"):
                state.metrics.stream_errors.inc()
                yield sse(_failure(gen, event.finish_reason).body())
                yield sse("[DONE]")
                return
            delta, finish = {}, event.finish_reason
            if event.reasoning_text:
                delta["reasoning_content"] = event.reasoning_text
            text, calls = event.text, []
            if held:
                text = held[index].feed(text)
                if finish is not None:
                    rest, calls = held[index].finish()
                    text += rest
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [c.openai(i) for i, c in enumerate(tools.keep(calls))]
                finish = "tool_calls"
            logprobs = {"content": chat_logprobs(event.logprobs)} if event.logprobs else None
            if delta or logprobs or finish:
                yield chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        results = await gen.results()
        outputs = [o for r in results for o in r.outputs]
        reasoning = sum(_reasoning_tokens(state.tokenizer, o) for o in outputs)
        totals = _usage(state, results, reasoning)
        _log_done(state, rid, results, [o.text for o in outputs])
        if include_usage:
            yield chunk([], usage=totals)
        yield sse("[DONE]")
    except Exception as e:  # the status line is sent: report in-band, as OpenAI does
        log.exception("%s failed mid-stream", rid)
        state.metrics.stream_errors.inc()
        yield sse(error_body(f"internal error: {type(e).__name__}", "server_error"))


# ---- completions ----------------------------------------------------------------------------------------
async def _complete_text(state, gen: Generation, body: CompletionRequest, rid: str):
    async for _, event in gen.events():
        if event.finish_reason in ("error", "cancelled"):
            raise _failure(gen, event.finish_reason)
    results = await gen.results()
    choices = []
    for i, r in enumerate(results):
        prompt = body.prompts()[i]
        echo = (prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt)) if body.echo else ""
        for o in r.outputs:
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(o.logprobs, len(echo))
                if body.echo:
                    first = state.tokenizer.decode(r.prompt_token_ids[:1])
                    echoed = completion_logprobs(r.prompt_logprobs[1:], 0, first_token=first)
                    logprobs = {key: echoed[key] + logprobs[key] for key in logprobs}
            choices.append({"index": i * body.n + o.index, "text": echo + o.text, "logprobs": logprobs,
                            "finish_reason": o.finish_reason})
    _log_done(state, rid, results, [c["text"] for c in choices])
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model,
            "system_fingerprint": None, "choices": choices, "usage": _usage(state, results, 0)}


async def _stream_completion(state, gen: Generation, body: CompletionRequest, rid: str):
    created = int(time.time())
    include_usage = body.include_usage()
    offsets: dict[int, int] = {}  # text_offset so far per choice, for logprobs

    def chunk(choices: list, **extra) -> str:
        out = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
               "system_fingerprint": None, "choices": choices, **extra}
        if include_usage:
            out.setdefault("usage", None)
        return sse(out)

    try:
        async for index, event in gen.events():
            if event.finish_reason in ("error", "cancelled"):
                state.metrics.stream_errors.inc()
                yield sse(_failure(gen, event.finish_reason).body())
                yield sse("[DONE]")
                return
            logprobs = None
            if event.logprobs is not None:
                logprobs = completion_logprobs(event.logprobs, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(e.token) for e in event.logprobs)
            if event.text or logprobs or event.finish_reason:
                yield chunk([{"index": index, "text": event.text, "logprobs": logprobs,
                              "finish_reason": event.finish_reason}])
        results = await gen.results()
        totals = _usage(state, results, 0)
        _log_done(state, rid, results, ["".join(o.text for o in r.outputs) for r in results])
        if include_usage:
            yield chunk([], usage=totals)
        yield sse("[DONE]")
    except Exception as e:
        log.exception("%s failed mid-stream", rid)
        state.metrics.stream_errors.inc()
        yield sse(error_body(f"internal error: {type(e).__name__}", "server_error"))


# ---- CLI ------------------------------------------------------------------------------------------------
def add_command(subparsers) -> set[str]:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible API, with a web chat at /",
        description="Serve a checkpoint directory (model + tokenizer) over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics) with a web chat at /. "
        "Binds to 127.0.0.1 unless --host says otherwise. With an API key every route but /health and "
        "the web page's own files needs 'Authorization: Bearer KEY'. Prompts and outputs are not logged "
        "unless --log-prompts. SIGTERM stops admitting, lets running streams finish (up to "
        "--shutdown-timeout seconds, then cancels them) and exits 0.",
    )
    p.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint directory with the tokenizer, or a Hub id org/name[@revision]")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--api-key", default=os.environ.get("HEMAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $HEMAT_API_KEY; none: open)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter (hemat's or PEFT's format) served as model id NAME beside the base "
                   "(repeatable); requests for every adapter and the base share one batch")
    p.add_argument("--max-concurrent", type=int, default=32, help="requests generating at once (default 32)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests waiting beyond those; more get 429 (default 128)")
    p.add_argument("--price-input", type=float, default=0.0, metavar="USD_PER_M",
                   help="USD per million prompt tokens, for usage.cost (default 0)")
    p.add_argument("--price-output", type=float, default=0.0, metavar="USD_PER_M",
                   help="USD per million completion tokens, for usage.cost (default 0)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body limit (default 4 MiB)")
    p.add_argument("--log-prompts", action="store_true", help="log prompts and outputs (off by default)")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    add_quantize_arguments(p)
    p.add_argument("--speculative", choices=("auto", "mtp", "off"), default="auto",
                   help="MTP speculative decoding when the checkpoint has MTP layers: auto (greedy requests draft "
                   "where measured to be faster), mtp (always draft) or off (default auto)")
    p.add_argument("--draft-tokens", type=draft_tokens_arg, default=None,
                   help="MTP draft tokens per round, chained past the MTP depth (default: the depth), or auto: "
                   "per sequence from its running acceptance")
    p.add_argument("--compile-decode", action="store_true",
                   help="CPU: compile the decode step (and greedy MTP draft-and-verify rounds) with torch.compile, "
                   "per batch/length bucket on a background thread (requests decode eagerly until their bucket is "
                   "ready; needs a C++ compiler)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running streams may take to finish after SIGTERM (default 30)")
    p.set_defaults(func=serve_command)
    return {"serve"}


class _Server(uvicorn.Server):
    """uvicorn's server with hemat's shutdown: SIGTERM/SIGINT mark the app draining (new requests get 503)
    and, unlike uvicorn.run, do not re-raise the signal after a graceful exit, so the process exits 0."""

    def __init__(self, app: FastAPI, config: uvicorn.Config):
        super().__init__(config)
        self.app = app

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                print(f"hemat serve: listening on http://{host}:{port}", flush=True)


def serve_command(args: argparse.Namespace) -> int:
    import hemat
    from hemat.infer.adapters import adapter_flags, prepare_with_adapters
    from hemat.infer.engine import Engine

    if not 0 <= args.port <= 65535:
        raise HematError(f"--port must be in [0, 65535], got {args.port}")
    model_dir = resolve_model_source(args.model)
    default_name = args.model if is_hub_id(args.model) else model_dir.resolve().name
    settings = ServeSettings(
        served_model_name=args.served_model_name or default_name, api_key=args.api_key or None,
        max_concurrent=args.max_concurrent, max_queue=args.max_queue, price_input=args.price_input,
        price_output=args.price_output, max_body_bytes=args.max_body_bytes, log_prompts=args.log_prompts,
    )
    try:
        settings.validate()
    except HematError as e:
        raise HematError(f"--{str(e).replace('_', '-')}") from None
    if not _is_loopback(args.host) and not settings.api_key:
        print(f"hemat serve: warning: binding {args.host} without an API key: anyone who can reach this "
              "port can use the model (set --api-key or HEMAT_API_KEY)", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    adapters = adapter_flags(args.lora, settings.served_model_name)
    if adapters:
        model = hemat.from_pretrained(model_dir, device=args.device, dtype=args.dtype)
        model = prepare_with_adapters(model, adapters, args.quantize, args.group_size)
    else:
        model = load_for_inference(model_dir, args.quantize, args.group_size, args.device, args.dtype)
    tokenizer = hemat.load_tokenizer(model_dir)
    engine = Engine(model, tokenizer, max_batch_size=args.max_concurrent, speculative=args.speculative,
                    num_speculative_tokens=args.draft_tokens, compile_decode=args.compile_decode)
    app = create_app(engine, tokenizer, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    _Server(app, config).run()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
