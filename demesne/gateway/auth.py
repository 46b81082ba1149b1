"""API-key middleware: ``Authorization: Bearer KEY`` checked in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web

from .openai import ApiError

OPEN_PATHS = frozenset({"/health", "/openapi.json"})


def api_key_middleware(keys: tuple[str, ...]):
    encoded = [k.encode() for k in keys]

    @web.middleware
    async def check_key(request: web.Request, handler):
        if request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not _matches(token.strip().encode(), encoded):
                raise ApiError(
                    401,
                    "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                    None,
                    "invalid_api_key",
                )
        return await handler(request)

    return check_key


def _matches(token: bytes, keys: list[bytes]) -> bool:
    # Compare against every key, so the time taken says nothing about which one was close.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found
