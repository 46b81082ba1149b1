"""The models this gateway serves, learnt from its engines: no model file is needed here.

An engine's Pong names its model (id, fingerprint, chat template, the digest of its
vocabulary-only GGUF). The first time a gateway meets a model (an id with a fingerprint) it asks
that engine for the vocabulary once (``GetVocab``), keeps it on disk under its digest
(:class:`VocabCache`), and builds the model's context off the event loop: tokenizer, chat
template, tool-call format. Until then that engine takes no requests.

One id is one model: an engine that claims an id already served by a live engine with another
fingerprint is refused by the engine client (one log line); an engine that comes back with a
different model under its old id, no other engine serving the old one, has the context rebuilt.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .. import protocol as p
from ..curve import OnceLog
from ..model import cache_dir

log = logging.getLogger("demesne.gateway")

KEEP_VOCABS = 16  # vocabularies kept in the cache directory, most recently used first
_DIGEST = re.compile(r"[0-9a-f]{64}")


class VocabError(ValueError):
    """A vocabulary an engine sent that is not the one its Pong announced."""


class VocabCache:
    """Vocabulary-only GGUFs by sha256, in ``directory`` (default: the user's cache directory,
    else a private temporary one)."""

    def __init__(self, directory: str | None = None):
        folder = Path(directory) if directory else cache_dir() / "vocab"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=folder)
            probe.close()
        except OSError as exc:
            fallback = tempfile.mkdtemp(prefix="demesne-vocab-")
            log.warning("cannot keep vocabularies in %s (%s); using %s for this run", folder, exc.strerror, fallback)
            folder = Path(fallback)
        self.directory = folder

    def get(self, digest: str) -> str | None:
        """The file with this digest, if it is here and intact."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            log.warning("%s is corrupt; fetching it again", path)
            return None
        os.utime(path)  # most recently used
        return str(path)

    def put(self, digest: str, data: bytes) -> str:
        path = self._path(digest)
        if len(data) > p.MAX_VOCAB_BYTES:
            raise VocabError(f"the vocabulary is {len(data)} bytes, more than {p.MAX_VOCAB_BYTES}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise VocabError("the vocabulary does not match the digest the engine announced")
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        self._prune()
        return str(path)

    def _path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):  # it names a file: never a path from a peer
            raise VocabError(f"not a vocabulary digest: {digest[:80]!r}")
        return self.directory / f"{digest}.gguf"

    def _prune(self) -> None:
        files = sorted(self.directory.glob("*.gguf"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in files[KEEP_VOCABS:]:
            old.unlink(missing_ok=True)


Fetch = Callable[[], Awaitable[bytes]]


class ModelRegistry:
    """Each served model's context (what ``build`` makes of its ModelInfo and vocabulary file),
    by id, with the fingerprint it was built for."""

    def __init__(self, build: Callable[[p.ModelInfo, str], Any], vocab: VocabCache):
        self.build = build
        self.vocab = vocab
        self.contexts: dict[str, Any] = {}
        self.fingerprints: dict[str, str] = {}
        self._loading: dict[tuple[str, str], asyncio.Task] = {}
        self._errors = OnceLog(log)

    def loaded(self, info: p.ModelInfo) -> bool:
        return self.fingerprints.get(info.id) == info.fingerprint

    def load(self, info: p.ModelInfo, fetch: Fetch) -> None:
        """Build the context of ``info``'s model in the background (``fetch`` gets its
        vocabulary from an engine if the cache has none). A failure is logged and tried again
        at the next call."""
        key = (info.id, info.fingerprint)
        if not self.loaded(info) and key not in self._loading:
            self._loading[key] = asyncio.get_running_loop().create_task(self._load(info, fetch))

    async def _load(self, info: p.ModelInfo, fetch: Fetch) -> None:
        key = (info.id, info.fingerprint)
        try:
            path = self.vocab.get(info.vocab_digest) or self.vocab.put(info.vocab_digest, await fetch())
            context = await asyncio.to_thread(self.build, info, path)
        except Exception as exc:  # noqa: BLE001 - an engine's bad vocabulary must not stop the gateway
            self._errors(key, "cannot load model %s from its engine: %s; trying again", info.id, exc)
            return
        finally:
            self._loading.pop(key, None)
        if info.id in self.fingerprints:
            log.warning("model %s changed (fingerprint %s, was %s): its vocabulary and template are reloaded", info.id, info.fingerprint, self.fingerprints[info.id])
        self.contexts[info.id] = context
        self.fingerprints[info.id] = info.fingerprint
        log.info("serving model %s (fingerprint %s)", info.id, info.fingerprint)

    async def close(self) -> None:
        for task in self._loading.values():
            task.cancel()
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
