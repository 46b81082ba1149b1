"""Route llama.cpp's own log lines through Python logging, warnings and errors only."""

from __future__ import annotations

import ctypes
import logging

import llama_cpp

log = logging.getLogger("demesne.llama")
_WARN, _ERROR = 3, 4  # ggml_log_level


@llama_cpp.llama_log_callback
def _forward(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    if level in (_WARN, _ERROR):
        log.warning("%s", text.decode("utf-8", "replace").rstrip())


def quiet_llama_logs() -> None:
    """Install the callback (a module-level object, so it is never garbage-collected)."""
    llama_cpp.llama_log_set(_forward, ctypes.c_void_p(0))
