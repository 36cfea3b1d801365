"""FastAPI app: OpenAI-compatible inference routes, an admin API over the registry, /health.

    GET  /health                                  no key
    GET  /, /ui/...                               the web dashboard (lorakit.ui): its own login
    GET  /v1/models                               inference key
    POST /v1/chat/completions, /v1/completions    inference key; "stream": true -> server-sent events
    POST /v1/score                                inference key; per answer token KL(model || base), log-probs
    GET|POST /admin/adapters, GET|DELETE /admin/adapters/{name}, POST /admin/adapters/{name}/rollback,
    POST /admin/adapters/{name}/evals             admin key

What a request's `model` names (adapters, a stack, a mixture `mix:name[@N]`) is resolved in serve/resolve.py.

Requests are parsed here (protocol.py) and handed to the engine thread; tokens come back through
an asyncio queue. Any bad request gets an OpenAI-style error body and the server keeps serving.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.adapters.mixtures import add_mixture, is_mixture
from lorakit.adapters.registry import Registry, parse_ref
from lorakit.generate import encode_prompt
from lorakit.serve import protocol as P
from lorakit.serve.engine import Engine, GenRequest, ScoreRequest
from lorakit.serve.fast import CacheFull, StaticEngine
from lorakit.serve.resolve import chat_prompt_for, registry_error, resolve_stack, served_header
from lorakit.serve.stops import TextStream
from lorakit.serve.runtime import BODY_TIMEOUT_S, ServerThread, cpu_threads  # noqa: F401 (part of this API)

log = logging.getLogger("lorakit.serve")


@dataclass
class ServerState:
    engine: Engine
    registry: Registry
    tok: object
    base_name: str
    api_keys: list[str]
    admin_key: str | None
    limits: P.Limits
    max_body_bytes: int = 1_000_000
    follower: object = None  # serve/follow.Follower when the registry is shared (PostgreSQL)
    body_timeout: float = BODY_TIMEOUT_S  # seconds a request body may take to arrive

    @property
    def base_ids(self) -> set[str]:
        return {self.base_name, "base"}


# ---------------------------------------------------------------- helpers
def _key_ok(request: Request, keys: list[str]) -> bool:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys)


def require_api_key(state: ServerState, request: Request) -> None:
    if state.api_keys and not _key_ok(request, state.api_keys):
        raise P.APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "invalid_api_key")


def require_admin(state: ServerState, request: Request) -> None:
    if not state.admin_key:
        raise P.APIError(403, "the admin API is disabled: start the server with --admin-key", "admin_disabled")
    if not _key_ok(request, [state.admin_key]):
        raise P.APIError(401, "missing or invalid admin key", "invalid_admin_key")


async def read_body(state: ServerState, request: Request, allow_empty: bool = False) -> dict:
    limit, chunks, size = state.max_body_bytes, [], 0
    if (declared := request.headers.get("content-length", "")).isdigit() and int(declared) > limit:
        raise P.APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}", "body_too_large")
    try:
        async with asyncio.timeout(state.body_timeout):  # a body trickled in slowly holds a connection: not long
            async for c in request.stream():
                if (size := size + len(c)) > limit:
                    raise P.APIError(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
                chunks.append(c)
    except TimeoutError:
        raise P.APIError(408, f"the request body did not arrive within {state.body_timeout:g} s", "body_timeout") \
            from None
    raw = b"".join(chunks)
    return {} if allow_empty and not raw.strip() else P.parse_json(raw)


async def events(state: ServerState, req: GenRequest | ScoreRequest) -> AsyncIterator[tuple]:
    """Submit to the engine and yield its events; cancels the request if the consumer goes away."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    req.sink = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
    try:
        state.engine.submit(req)
    except ValueError as e:
        raise P.bad(str(e), "model") from None
    except CacheFull as e:
        raise P.APIError(429, str(e), "cache_full") from None
    except RuntimeError as e:
        raise P.APIError(503, str(e), "shutting_down") from None
    try:
        while True:
            ev = await queue.get()
            yield ev
            if ev[0] != "token":
                return
    finally:
        req.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---------------------------------------------------------------- generation
async def complete(state: ServerState, request: Request, kind: str):
    require_api_key(state, request)
    body = await read_body(state, request)
    p = P.parse_request(body, kind, state.base_ids, state.limits)
    uses, mixture = resolve_stack(state.registry, p.stack)
    ids = prompt_ids(state, p)
    max_tokens = P.check_prompt(ids, p.max_tokens, kind, state.limits)
    req = GenRequest(list(ids), uses, max_tokens, p.temperature, p.top_p, p.seed, p.ignore_eos, mixture)
    served = {"x-lorakit-served": served_header(uses, mixture)}
    stream = TextStream(state.tok, p.stop)
    rid = P.new_id(kind)
    evs = events(state, req)
    first = await evs.__anext__()  # errors before the first token still get a proper HTTP status
    if first[0] == "error":
        await evs.aclose()
        raise P.APIError(500, first[1], "generation_failed")
    if not p.stream:
        watch = asyncio.create_task(_cancel_on_disconnect(request, req))
        try:
            reason = await _collect(first, evs, stream, req)
        finally:
            watch.cancel()
            await evs.aclose()
        return JSONResponse(P.response(p, rid, stream.text, reason, stream.ids, len(ids)), headers=served)
    return StreamingResponse(_stream(p, rid, first, evs, stream, req, len(ids)), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **served})


def prompt_ids(state: ServerState, p: P.Parsed) -> list[int]:
    """The request's prompt as token ids: as sent, or rendered for its model (serve/resolve.py) and tokenized."""
    try:
        if isinstance(p.prompt, list) and p.prompt and isinstance(p.prompt[0], int):
            return list(p.prompt)
        return list(encode_prompt(state.tok, chat_prompt_for(state.registry, state.tok, p)))
    except (UnicodeError, ValueError, TypeError) as e:  # e.g. a lone surrogate the tokenizer cannot encode
        raise P.bad(f"the prompt cannot be tokenized: {type(e).__name__}: {e}",
                    "messages" if p.kind == "chat" else "prompt") from None


async def score(state: ServerState, request: Request) -> dict:
    """POST /v1/score: one forward of prompt + completion under the model and under the base, on the engine."""
    require_api_key(state, request)
    p, completion = P.parse_score(await read_body(state, request), state.base_ids, state.limits)
    uses, mixture = resolve_stack(state.registry, p.stack)
    ids = prompt_ids(state, p)
    P.check_prompt(ids, 1, p.kind, state.limits)
    if isinstance(completion, str):
        try:
            completion = state.tok(completion, add_special_tokens=False)["input_ids"]
        except (UnicodeError, ValueError, TypeError) as e:
            raise P.bad(f"the completion cannot be tokenized: {type(e).__name__}: {e}", "completion") from None
    P.check_completion(completion, len(ids), state.limits)
    req = ScoreRequest(ids, list(completion), uses, mixture)
    evs = events(state, req)
    watch = asyncio.create_task(_cancel_on_disconnect(request, req))
    try:
        kind, result = await evs.__anext__()
    finally:
        watch.cancel()
        await evs.aclose()
    if kind != "score":
        raise P.APIError(500, result if kind == "error" else "the scoring request was cancelled", "scoring_failed")
    return P.score_response(p, state.base_name, len(ids), req.answer, result)


DISCONNECT_POLL_S = 0.25


async def _cancel_on_disconnect(request: Request, req: GenRequest) -> None:
    """A non-streaming request whose client has gone away stops decoding (its row is freed at the next
    step). Streaming requests need no watcher: the failed write ends the stream, whose cleanup cancels."""
    while not req.cancelled:
        if await request.is_disconnected():
            log.info("client disconnected; cancelling its request")
            req.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _collect(first, evs, stream: TextStream, req: GenRequest) -> str:
    ev = first
    while True:
        if ev[0] == "token":
            stream.add(ev[1])
            if stream.stopped:
                req.cancel()
                return "stop"
        elif ev[0] == "done":
            stream.finish()
            return "stop" if ev[1] == "cancelled" else ev[1]
        else:
            raise P.APIError(500, ev[1], "generation_failed")
        ev = await evs.__anext__()


async def _stream(p: P.Parsed, rid: str, first, evs, stream: TextStream, req: GenRequest, n_prompt: int):
    if p.kind == "chat":
        yield _sse(P.chunk(p, rid, None, role=True))
    ev, reason = first, None
    try:
        while reason is None:
            if ev[0] == "token":
                piece = stream.add(ev[1])
                if piece or p.return_token_ids:
                    yield _sse(P.chunk(p, rid, piece, ids=[ev[1]]))
                if stream.stopped:
                    req.cancel()
                    reason = "stop"
                    break
            elif ev[0] == "done":
                reason = "stop" if ev[1] == "cancelled" else ev[1]
                break
            else:
                yield _sse(P.APIError(500, ev[1], "generation_failed").body())
                return
            ev = await evs.__anext__()
        tail = stream.finish()
        if tail:
            yield _sse(P.chunk(p, rid, tail, ids=[]))
        yield _sse(P.chunk(p, rid, None if p.kind == "chat" else "", reason=reason))
        if p.include_usage:
            yield _sse(P.usage_chunk(p, rid, n_prompt, len(stream.ids)))
        yield "data: [DONE]\n\n"
    finally:
        await evs.aclose()


# ---------------------------------------------------------------- app
def build_app(state: ServerState, ui=None) -> FastAPI:
    """The API; the web dashboard (lorakit.ui) at / with `ui` its UIOptions (runs/sweeps dirs)."""
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lorakit = state

    @app.exception_handler(P.APIError)
    async def _api_error(_, e: P.APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return JSONResponse(P.APIError(e.status_code, str(e.detail), "http_error").body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return JSONResponse(P.bad(str(e.errors())).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(P.APIError(500, f"internal error: {type(e).__name__}: {e}", "internal").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        shared = {"registry": state.follower.info()} if state.follower is not None else {}
        return {"status": "ok", "model": state.base_name, "engine": state.engine.info(), **shared}

    @app.get("/v1/models")
    async def models(request: Request):
        require_api_key(state, request)
        now = int(time.time())
        data = [{"id": state.base_name, "object": "model", "created": now, "owned_by": "lorakit"}]
        for v in state.registry.list():
            for ver in state.registry.versions(v.name):
                ids = [v.name, f"{v.name}@{ver.version}"] if ver.current else [f"{v.name}@{ver.version}"]
                for mid in ids:
                    data.append({"id": mid, "object": "model", "created": int(ver.created_at), "owned_by": "lorakit",
                                 "parent": state.base_name, "root": f"{v.name}@{ver.version}"})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(state, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(state, request, "completion")

    @app.post("/v1/score")
    async def score_route(request: Request):
        return await score(state, request)

    add_admin_routes(app, state)
    mount_ui(app, state, ui)
    return app


def mount_ui(app: FastAPI, state: ServerState, options=None) -> None:
    try:
        from lorakit.ui import mount
    except ImportError as e:  # jinja2 is in the serve extra; the API works without it
        log.warning("web dashboard disabled: %s (pip install jinja2)", e)
        return
    mount(app, state, options)


def add_admin_routes(app: FastAPI, state: ServerState) -> None:
    reg = state.registry

    def call(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except FileNotFoundError as e:
            raise P.APIError(400, str(e), "file_not_found") from None
        except ValueError as e:
            raise registry_error(e) from None

    @app.get("/admin/adapters")
    async def list_adapters(request: Request):
        require_admin(state, request)
        return {"object": "list", "data": [v.to_json() for v in reg.list()]}

    @app.post("/admin/adapters")
    async def add_adapter(request: Request):
        require_admin(state, request)
        body = await read_body(state, request)
        name, path, desc = body.get("name"), body.get("path"), body.get("description") or ""
        if not isinstance(path, str) or not path:
            raise P.bad("'path' must name the adapter directory on the server", "path")
        if not isinstance(desc, str):
            raise P.bad(f"'description' must be a string, got {desc!r}", "description")
        if is_mixture(path):  # a mixture dir: mix:<name>, pinned to the adapter versions of its hashes
            v = await asyncio.to_thread(call, add_mixture, reg, name, path, description=desc)
        else:
            v = await asyncio.to_thread(call, reg.add, name, path, description=desc, force=P.flag(body, "force"),
                                        max_rank=state.engine.bank.max_rank)
        return JSONResponse(v.to_json(), status_code=201)

    @app.get("/admin/adapters/{name}")
    async def show(name: str, request: Request):
        require_admin(state, request)
        return call(reg.describe, name)

    @app.post("/admin/adapters/{name}/rollback")
    async def rollback(name: str, request: Request):
        require_admin(state, request)
        body = await read_body(state, request, allow_empty=True)
        to = body.get("version")
        if to is not None and (isinstance(to, bool) or not isinstance(to, int)):
            raise P.bad(f"'version' must be an integer, got {to!r}", "version")
        return call(reg.rollback, name, to).to_json()

    @app.delete("/admin/adapters/{ref}")
    async def remove(ref: str, request: Request):
        require_admin(state, request)
        gone = call(reg.remove, ref)
        unloaded = await asyncio.wrap_future(state.engine.unload([v.sha256 for v in gone]))
        return {"removed": [f"{v.name}@{v.version}" for v in gone], "unloaded": unloaded}

    @app.post("/admin/adapters/{ref}/evals")
    async def add_eval(ref: str, request: Request):
        require_admin(state, request)
        body = await read_body(state, request)
        call(reg.add_eval, ref, body.get("metrics"))
        return call(reg.describe, call(parse_ref, ref)[0])


# ---------------------------------------------------------------- running
def make_state(model, tok, registry: Registry, cfg, base_name: str, max_prefill_tokens: int = 4096,
               static: bool | None = None) -> ServerState:
    """Engine (started) + registry + limits from a ServeConfig. static: the static-cache engine (serve/fast.py);
    default: on a CUDA device, the plain engine elsewhere."""
    kw = dict(max_slots=cfg.max_slots, max_batch=cfg.max_batch, max_rank=cfg.max_lora_rank,
              max_prefill_tokens=max_prefill_tokens, base_fp=registry.base_fp)
    max_len = cfg.max_prompt_tokens + cfg.max_new_tokens  # StaticEngine: at most the model's context
    if static if static is not None else next(model.parameters()).device.type == "cuda":
        engine = StaticEngine(model, tok, max_len=max_len, max_waiting=8 * cfg.max_batch, **kw).start()
    else:
        engine = Engine(model, tok, **kw).start()
    limits = P.Limits(cfg.max_prompt_tokens, cfg.max_new_tokens, engine.max_len,
                      int(getattr(model.config, "vocab_size", 0) or 0))
    return ServerState(engine, registry, tok, base_name, list(cfg.api_keys), cfg.admin_key, limits,
                       cfg.max_body_bytes, body_timeout=cfg.body_timeout)
