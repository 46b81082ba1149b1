"""Typed keys for what the gateway application holds."""

from __future__ import annotations

from aiohttp import web

from ..config import GatewayConfig
from .engine_client import EngineClient
from .generation import ModelContext
from .observability import Observability
from .response_store import ResponseStore

CONFIG = web.AppKey("config", GatewayConfig)
CLIENT = web.AppKey("engine_client", EngineClient)
MODELS = web.AppKey("models", dict[str, ModelContext])
FINGERPRINT = web.AppKey("fingerprint", str)
STARTED = web.AppKey("started", float)
OBSERVABILITY = web.AppKey("observability", Observability)
RESPONSES = web.AppKey("responses", ResponseStore)
