"""What an engine tells gateways about its GGUF beyond ModelInfo's plain fields: a fingerprint
of the model, and a vocabulary-only copy of the file so that a gateway needs no model file.

A GGUF is a header, a key-value metadata section (architecture, hyperparameters, the whole
tokenizer, the chat template), tensor descriptions, then the weights. llama.cpp loads a file
with the same metadata and no tensors as a vocabulary (``vocab_only``; its own test vocabularies
are such files), so the vocabulary-only copy is the header with a tensor count of 0 and the
metadata section byte for byte: nothing is reinterpreted, so nothing can be lost in a rewrite.
(The ``gguf`` package's reader parses every token string into its own numpy view: 9.8 s for
Gemma's 262,144 tokens on a 2-core machine, holding the GIL beside the step loop; walking the
section to find its end takes 46 ms.)

The fingerprint names the model, not the file: a hash of the metadata and tensor descriptions,
the file size and 16 samples of 64 KiB spread over the weights, from the first to the file's
last byte. Two fine-tunes of one base differ in their weights and so in the samples; copies of
one file on two hosts agree. Reading all of a 40 GB file to hash it would delay every engine
start by minutes.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass

GGUF_MAGIC = b"GGUF"
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
# Fixed sizes of GGUF value types by type id (8: string, 9: array are walked).
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
SAMPLES = 16
SAMPLE_BYTES = 64 << 10


class GGUFError(ValueError):
    """Not a GGUF file this module can read."""


@dataclass(frozen=True, slots=True)
class ModelCard:
    fingerprint: str  # the model's identity (see the module docstring)
    vocab: bytes  # the vocabulary-only GGUF
    vocab_digest: str  # sha256 of ``vocab``: gateways cache it under this name


def read_card(path: str) -> ModelCard:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return card_of(buf)


def card_of(buf) -> ModelCard:
    """The card of a GGUF held in ``buf`` (bytes or a memory map)."""
    if len(buf) < _HEADER.size:
        raise GGUFError("too short for a GGUF header")
    magic, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
    if magic != GGUF_MAGIC or version not in (2, 3):
        raise GGUFError(f"not a GGUF v2/v3 file (magic {magic!r}, version {version})")
    try:
        kv_end = _skip_metadata(buf, _HEADER.size, n_kv)
        infos_end = _skip_tensor_infos(buf, kv_end, n_tensors)
    except struct.error:
        raise GGUFError("the metadata runs past the end of the file") from None
    vocab = _HEADER.pack(GGUF_MAGIC, version, 0, n_kv) + bytes(buf[_HEADER.size : kv_end])
    return ModelCard(_fingerprint(buf, infos_end), vocab, hashlib.sha256(vocab).hexdigest())


def _fingerprint(buf, infos_end: int) -> str:
    h = hashlib.sha256()
    h.update(struct.pack("<Q", len(buf)))
    h.update(buf[:infos_end])
    span = max(len(buf) - infos_end - SAMPLE_BYTES, 0)
    for i in range(SAMPLES):  # the first at the weights' start, the last ending with the file
        at = infos_end + span * i // (SAMPLES - 1)
        h.update(buf[at : at + SAMPLE_BYTES])
    return h.hexdigest()[:32]


def _skip_metadata(buf, off: int, n_kv: int) -> int:
    for _ in range(n_kv):
        off = _skip_string(buf, off)
        (kind,) = struct.unpack_from("<I", buf, off)
        off = _skip_value(buf, off + 4, kind)
    return off


def _skip_value(buf, off: int, kind: int) -> int:
    if kind == _STRING:
        return _skip_string(buf, off)
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if item == _STRING:
            for _ in range(count):
                off = _skip_string(buf, off)
            return off
        if item not in _SIZES:
            raise GGUFError(f"unsupported array item type {item}")
        return _check(buf, off + _SIZES[item] * count)
    if kind not in _SIZES:
        raise GGUFError(f"unknown metadata value type {kind}")
    return _check(buf, off + _SIZES[kind])


def _skip_string(buf, off: int) -> int:
    (n,) = struct.unpack_from("<Q", buf, off)
    return _check(buf, off + 8 + n)


def _skip_tensor_infos(buf, off: int, n_tensors: int) -> int:
    for _ in range(n_tensors):
        off = _skip_string(buf, off)
        (n_dims,) = struct.unpack_from("<I", buf, off)
        off = _check(buf, off + 4 + 8 * n_dims + 4 + 8)  # dims, type, data offset
    return off


def _check(buf, off: int) -> int:
    if off > len(buf):
        raise GGUFError("the metadata runs past the end of the file")
    return off
