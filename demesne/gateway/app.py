"""init_app(config): the aiohttp application, its middlewares and its lifetime."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Awaitable

from aiohttp import web

from .. import __version__
from .. import protocol as p
from ..config import GatewayConfig
from .app_keys import CLIENT, CONFIG, FINGERPRINT, MODELS, OBSERVABILITY, RESPONSES, STARTED
from .response_store import ResponseStore
from .auth import OPEN_PATHS, api_key_middleware
from .chat_template import ChatTemplate, TemplateError
from .engine_client import EngineClient
from .generation import ModelContext
from .models import ModelRegistry, VocabCache
from .observability import STATS, Observability
from .errors import ApiError, body_for
from .routes import setup_routes
from .tokenizer import Tokenizer
from .tool_formats import FORMATS, detect

log = logging.getLogger("demesne.gateway")


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error leaves as the OpenAI error shape; nothing a client sends takes us down."""
    try:
        return await handler(request)
    except ApiError as exc:
        # 503 is always temporary here (an engine restarting, draining or busy): say when to retry.
        headers = {"Retry-After": "2"} if exc.status == 503 else None
        return web.json_response(body_for(request.path, exc), status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        body = body_for(request.path, ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}", None, code))
        return web.json_response(body, status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        body = body_for(request.path, ApiError(500, "internal server error", None, "internal_error"))
        return web.json_response(body, status=500)


def observe_middleware(observability: Observability):
    """Times every request, counts its status, and has its access-log line written."""

    @web.middleware
    async def observe(request: web.Request, handler):
        started = time.monotonic()
        status = 499  # the client went away before the response was done (nginx's number)
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except ConnectionResetError:  # the client went away: 499 as above, not a server error
            raise
        except Exception:
            status = 500
            raise
        finally:
            observability.finished(request, status, started)

    return observe


CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "X-Api-Key")
CORS_EXPOSE_HEADERS = "X-Request-Id, Retry-After"


class Cors:
    """CORS for the browser origins given with ``--cors-origin`` (``*``: any): preflight
    ``OPTIONS`` requests are answered here, before the API key is checked (browsers send
    them without one), and every response to an allowed origin carries its headers."""

    def __init__(self, origins: tuple[str, ...]):
        self.origins = frozenset(origins)

    def allowed(self, request: web.Request) -> str | None:
        """The Access-Control-Allow-Origin value for this request, if its origin may call."""
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        return "*" if "*" in self.origins else origin if origin in self.origins else None

    @web.middleware
    async def preflight(self, request: web.Request, handler):
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        origin = self.allowed(request)
        if origin is None:
            raise ApiError(403, f"the origin {request.headers.get('Origin')!r} may not call this server (--cors-origin)", None, "origin_not_allowed")
        asked = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")]
        allow = dict.fromkeys([*CORS_ALLOW_HEADERS, *(h for h in asked if h and h.replace("-", "").isalnum())])
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": ", ".join(allow),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = self.allowed(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
            if origin != "*":
                response.headers["Vary"] = "Origin"


async def _request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """The engine request ids of a completion, as in the access log."""
    stats = request.get(STATS)
    if stats is not None and stats.rids:
        response.headers["X-Request-Id"] = ",".join(stats.rids)


def _model_builder(config: GatewayConfig):
    """The context of one served model, from its ModelInfo and vocabulary file (runs in a
    thread: loading a vocabulary and scanning it take a while)."""

    def build(info: p.ModelInfo, vocab_path: str) -> ModelContext:
        tokenizer = Tokenizer(vocab_path)
        try:
            template = ChatTemplate.select(config.template_for(info.id), info.chat_template, info.bos_token, info.eos_token)
        except (TemplateError, OSError) as exc:
            log.error("%s; chat requests to %s use the built-in fallback template", exc, info.id)
            template = ChatTemplate.select(None, None, info.bos_token, info.eos_token)
        fmt_name = config.tool_format_for(info.id)
        fmt = FORMATS[fmt_name] if fmt_name != "auto" else detect(template.source)
        tokenizer.render_special(fmt.special)  # Llama's <|python_tag|>, Mistral's [TOOL_CALLS]
        tokenizer.control_pattern  # built now (a pass over the vocabulary), not on the first chat request
        log.info("model %s: context %d tokens, tool calls in the %s format", info.id, info.n_ctx, fmt.name)
        return ModelContext(info, tokenizer, template, fmt)

    return build


def _engine_client_ctx(registry: ModelRegistry):
    async def engine_client(app: web.Application):
        config = app[CONFIG]
        client = EngineClient(config, registry)
        app[CLIENT] = client
        await client.start()
        reloads = config.engines_file is not None and threading.current_thread() is threading.main_thread()
        if reloads:  # SIGHUP re-reads the engine list
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, client.reload)
        yield
        if reloads:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await client.close()

    return engine_client


def init_app(config: GatewayConfig) -> web.Application:
    observability = Observability()
    cors = Cors(config.cors_origins) if config.cors_origins else None
    middlewares = [observe_middleware(observability), error_middleware]
    if cors is not None:
        middlewares.append(cors.preflight)  # before the key check: preflights carry no key
    if config.api_keys:
        open_paths = OPEN_PATHS | {"/metrics"} if config.public_metrics else OPEN_PATHS
        middlewares.append(api_key_middleware(config.api_keys, open_paths))
    else:
        log.warning("NO API KEY IS SET: anyone who can reach %s:%d can use this server", config.host, config.port)
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    registry = ModelRegistry(_model_builder(config), VocabCache(config.vocab_cache))
    app[MODELS] = registry.contexts
    app[FINGERPRINT] = f"demesne-{__version__}"
    app[RESPONSES] = ResponseStore(config.response_store)
    app[STARTED] = time.time()
    app[OBSERVABILITY] = observability
    app.on_response_prepare.append(_request_id_header)
    if cors is not None:
        app.on_response_prepare.append(cors.on_response_prepare)
    app.cleanup_ctx.append(_engine_client_ctx(registry))
    setup_routes(app)
    return app


async def serve_gateway(config: GatewayConfig, until: Awaitable | None = None) -> None:
    """Serve until ``until`` completes (by default: SIGINT or SIGTERM). Handlers are
    cancelled when their client disconnects."""
    runner = web.AppRunner(init_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.info("gateway listening on http://%s:%d/v1", config.host, config.port)
    try:
        await (until if until is not None else stop_signal())
    finally:
        log.info("gateway stopping")
        await runner.cleanup()


async def stop_signal() -> None:
    """Returns on the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
