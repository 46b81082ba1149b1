"""init_app(config): the aiohttp application, its middlewares and its lifetime."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web

from .. import __version__
from .. import protocol as p
from ..config import GatewayConfig
from .app_keys import CLIENT, CONFIG, FINGERPRINT, MODELS, STARTED
from .auth import api_key_middleware
from .chat_template import ChatTemplate, TemplateError
from .engine_client import EngineClient
from .generation import ModelContext
from .openai import ApiError
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
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        body = ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}", None, code).body()
        return web.json_response(body, status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return web.json_response(ApiError(500, "internal server error", None, "internal_error").body(), status=500)


def _model_loader(app: web.Application):
    def on_model(info: p.ModelInfo) -> None:
        config = app[CONFIG]
        path = config.model or info.path
        try:
            tokenizer = Tokenizer(path)
        except OSError as exc:
            log.error("%s; pass --model with a local copy of the engine's GGUF", exc)
            return
        try:
            template = ChatTemplate.select(config.chat_template, info.chat_template, info.bos_token, info.eos_token)
        except (TemplateError, OSError) as exc:
            log.error("%s; chat requests use the built-in fallback template", exc)
            template = ChatTemplate.select(None, None, info.bos_token, info.eos_token)
        fmt = FORMATS[config.tool_format] if config.tool_format != "auto" else detect(template.source)
        tokenizer.render_special(fmt.special)  # Llama's <|python_tag|>, Mistral's [TOOL_CALLS]
        app[MODELS][info.id] = ModelContext(info, tokenizer, template, fmt)
        log.info("serving model %s (context %d tokens, tool calls in the %s format)", info.id, info.n_ctx, fmt.name)

    return on_model


async def _engine_client_ctx(app: web.Application):
    client = EngineClient(app[CONFIG], on_model=_model_loader(app))
    app[CLIENT] = client
    await client.start()
    yield
    await client.close()


def init_app(config: GatewayConfig) -> web.Application:
    middlewares = [error_middleware]
    if config.api_keys:
        middlewares.append(api_key_middleware(config.api_keys))
    else:
        log.warning("NO API KEY IS SET: anyone who can reach %s:%d can use this server", config.host, config.port)
    app = web.Application(middlewares=middlewares, client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[MODELS] = {}
    app[FINGERPRINT] = f"demesne-{__version__}"
    app[STARTED] = time.time()
    app.cleanup_ctx.append(_engine_client_ctx)
    setup_routes(app)
    return app


async def serve_gateway(config: GatewayConfig) -> None:
    """Serve until SIGINT or SIGTERM. Handlers are cancelled when their client disconnects."""
    runner = web.AppRunner(init_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    log.info("gateway listening on http://%s:%d/v1", config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("gateway stopping")
        await runner.cleanup()
