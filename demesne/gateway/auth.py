"""API-key middleware: ``Authorization: Bearer KEY`` or ``X-Api-Key: KEY`` (as llama-server
and Anthropic-style clients send it), checked in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web

from .errors import ApiError

OPEN_PATHS = frozenset({"/health", "/openapi.json"})


def api_key_middleware(keys: tuple[str, ...], open_paths: frozenset[str] = OPEN_PATHS):
    encoded = [k.encode() for k in keys]

    @web.middleware
    async def check_key(request: web.Request, handler):
        if request.path not in open_paths and not any(_matches(token, encoded) for token in _offered(request)):
            raise ApiError(
                401,
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.",
                None,
                "invalid_api_key",
            )
        return await handler(request)

    return check_key


def _offered(request: web.Request) -> list[bytes]:
    """The keys a request offers, as bytes: a bearer token, an X-Api-Key header."""
    offered = []
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(bearer)
    offered += request.headers.getall("X-Api-Key", [])
    # Header bytes that are not UTF-8 arrive as surrogate escapes: give them back as the bytes
    # they were (which then match no key) rather than fail to encode them.
    return [token.strip().encode("utf-8", "surrogateescape") for token in offered]


def _matches(token: bytes, keys: list[bytes]) -> bool:
    # Compare against every key, so the time taken says nothing about which one was close.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found
