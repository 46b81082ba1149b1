"""The only engine module that imports llama_cpp: model and context, the batch, decode, KV ops.

Everything above this module speaks numpy arrays and sequence ids; nothing else touches
ctypes. The KV cache is either one stream per sequence (``--kv-layout streams``: each seq id
has ``ctx_size / max_seqs`` cells of its own, and a step attends each row over its own
stream) or *unified* (one pool of ``ctx_size`` cells shared by every sequence, so a cell can
belong to several sequences at once). Sliding-window caches are always full size
(``swa_full``), without which reusing KV across sequences is wrong on SWA models such as
Gemma 3 (see shared/LLAMA_FACTS.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import time

import llama_cpp
import numpy as np

from ..config import EngineConfig
from ..llama_logs import quiet_llama_logs
from .invariant import InvariantDecoder, NotInvariant

log = logging.getLogger("demesne.engine")

_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
_SPLIT_MODES = {
    "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
}
_FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


LLAMA_MAX_SEQ = 256  # the most sequence ids a llama.cpp context takes
LOGITS_VIEWS = 64  # numpy views of the logits buffer kept, by row count


def seq_ids_for(config: EngineConfig) -> int:
    """Sequence ids of the context. Streams: one per request. Unified: ``max_seqs`` for
    requests, the rest for trie nodes.

    llama.cpp sizes its logits buffer by the number of sequence ids (n_vocab floats each,
    1 MiB for a 262k vocabulary), so not all 256; the trie gets at least 2 * max_seqs + 1,
    so every running request can always admit another beside it.
    """
    if config.streams:
        return config.max_seqs
    return min(LLAMA_MAX_SEQ, 4 * config.max_seqs)


class ModelLoadError(RuntimeError):
    """The GGUF could not be loaded or the context could not be created."""


class DecodeError(RuntimeError):
    def __init__(self, code: int):
        super().__init__(f"llama_decode returned {code}")
        self.code = code  # 1: no KV slot for the batch; the KV state is unchanged


class Batch:
    """A ``llama_batch`` whose arrays are numpy-owned, so the hot loop fills them by slices.

    Each token may carry up to ``n_seq_max`` sequence ids: row ``i`` of ``seq_id`` holds the
    ids and ``n_seq_id[i]`` says how many are valid. Nothing here is freed by llama.cpp.
    """

    def __init__(self, capacity: int, n_seq_max: int):
        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq_id = np.zeros((capacity, n_seq_max), np.int32)
        self.logits = np.zeros(capacity, np.int8)
        row_addr = self.seq_id.ctypes.data + np.arange(capacity, dtype=np.uintp) * self.seq_id.strides[0]
        self._seq_rows = row_addr  # one pointer per token, into the seq_id block
        self._iota = np.arange(capacity, dtype=np.int32)
        self.n_tokens = 0
        self.n_outputs = 0
        self._struct = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._ptr(self.token, llama_cpp.llama_token),
            embd=None,
            pos=self._ptr(self.pos, llama_cpp.llama_pos),
            n_seq_id=self._ptr(self.n_seq_id, ctypes.c_int32),
            seq_id=ctypes.cast(self._seq_rows.ctypes.data, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id))),
            logits=self._ptr(self.logits, ctypes.c_int8),
        )

    @staticmethod
    def _ptr(array: np.ndarray, ctype):
        return array.ctypes.data_as(ctypes.POINTER(ctype))

    def clear(self) -> None:
        self.n_tokens = 0
        self.n_outputs = 0

    def add_span(self, tokens, pos0: int, seq_ids: int | list[int], output_last: bool, output_all: bool = False) -> None:
        """Append consecutive tokens starting at position ``pos0``, each belonging to
        ``seq_ids`` (one id, or several: one cell then serves all of those sequences); the
        last one (or all of them) with an output row."""
        n, k = self.n_tokens, len(tokens)
        end = n + k
        self.token[n:end] = tokens
        np.add(self._iota[:k], pos0, out=self.pos[n:end])
        if isinstance(seq_ids, int):
            self.n_seq_id[n:end] = 1
            self.seq_id[n:end, 0] = seq_ids
        else:
            self.n_seq_id[n:end] = len(seq_ids)
            self.seq_id[n:end, : len(seq_ids)] = seq_ids
        self.logits[n:end] = output_all
        if output_all:
            self.n_outputs += k
        elif output_last:
            self.logits[end - 1] = 1
            self.n_outputs += 1
        self.n_tokens = end

    def as_struct(self) -> llama_cpp.llama_batch:
        self._struct.n_tokens = self.n_tokens
        return self._struct


class ModelRunner:
    """Owns the llama.cpp model, context and batch; decodes a batch and hands back logits."""

    def __init__(self, config: EngineConfig):
        llama_cpp.llama_backend_init()
        quiet_llama_logs()
        self.config = config
        self._tensor_split = None  # kept alive: the model params point into it
        self.model = self._load_model(config)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_seq_max = seq_ids_for(config)
        self.ctx = self._new_context(config)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ctx)  # the most one sequence may hold
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.batch = Batch(config.batch_size, self.n_seq_max)
        self._logits_address: int | None = None
        self._logits_views: dict[int, np.ndarray] = {}
        self.invariant = self._invariant() if config.deterministic else None
        self.eog = np.array(
            [llama_cpp.llama_vocab_is_eog(self.vocab, t) for t in range(self.n_vocab)], dtype=bool
        )

    def _invariant(self) -> InvariantDecoder:
        """--deterministic: steps in batch-invariant shapes (invariant.py), proven on this build."""
        n_ubatch = llama_cpp.llama_n_ubatch(self.ctx)
        batch = Batch(n_ubatch, 1)
        decoder = InvariantDecoder(self, batch, self.n_vocab, self.n_seq_max, self.n_ctx_seq, n_ubatch)
        try:
            decoder.check()
        except NotInvariant as exc:
            raise ModelLoadError(str(exc)) from None
        return decoder

    def _load_model(self, config: EngineConfig):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = config.n_gpu_layers if config.n_gpu_layers >= 0 else 0x7FFFFFFF
        params.split_mode = _SPLIT_MODES[config.split_mode]
        params.main_gpu = config.main_gpu
        if config.tensor_split:
            n_dev = llama_cpp.llama_max_devices()
            values = list(config.tensor_split)[:n_dev] + [0.0] * max(0, n_dev - len(config.tensor_split))
            self._tensor_split = (ctypes.c_float * n_dev)(*values)
            params.tensor_split = self._tensor_split
        model = llama_cpp.llama_model_load_from_file(config.model.encode(), params)
        if not model:
            raise ModelLoadError(f"cannot load model {config.model}")
        return model

    def _new_context(self, config: EngineConfig):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.ctx_size
        params.n_batch = config.batch_size
        params.n_ubatch = min(config.ubatch_size, config.batch_size)
        params.n_seq_max = self.n_seq_max
        params.n_outputs_max = max(config.batch_size, self.n_seq_max)  # llama.cpp asks >= n_seq_max
        threads = config.threads or _physical_cores()
        params.n_threads = threads
        params.n_threads_batch = config.threads_batch or threads
        params.flash_attn_type = _FLASH_ATTN[config.flash_attn]
        params.type_k = _CACHE_TYPES[config.cache_type_k]
        params.type_v = _CACHE_TYPES[config.cache_type_v]
        params.kv_unified = not config.streams
        params.swa_full = True
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise ModelLoadError(
                "cannot create the llama.cpp context (too little memory for --ctx-size, or a"
                " quantized V cache without flash attention?)"
            )
        return ctx

    # -- model facts -------------------------------------------------------------------

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def llg_tokenizer(self):
        """llguidance's tokenizer for this vocabulary (constraints.py), every end-of-generation
        token an end of the grammar's output. Slow (seconds for 262k tokens): call it once,
        off the step loop."""
        from llguidance.llamacpp import lltokenizer_from_vocab

        # It reads each token's attributes through an alias llama-cpp-python marks deprecated:
        # a warning per token (filtered or not, a second of the build for 262,144 tokens). The
        # alias becomes the call its warning names, which takes the same arguments.
        llama_cpp.llama_token_get_attr = llama_cpp.llama_vocab_get_attr
        return lltokenizer_from_vocab(self.vocab, eos_token=np.flatnonzero(self.eog).tolist())

    def bos_eos_text(self) -> tuple[str, str]:
        return (
            self.token_text(llama_cpp.llama_vocab_bos(self.vocab)),
            self.token_text(llama_cpp.llama_vocab_eos(self.vocab)),
        )

    # -- the step ----------------------------------------------------------------------

    def decode(self) -> np.ndarray:
        """Run the filled batch; return a read-only view of its logits, (n_outputs, n_vocab).

        The view is valid until the next decode.
        """
        b = self.batch
        if self.invariant:
            n = b.n_tokens
            return self.invariant.decode(b.token[:n], b.pos[:n], b.seq_id[:n, 0], b.logits[:n].astype(bool), b.n_outputs)
        return self.decode_batch(b)

    def decode_batch(self, batch: Batch) -> np.ndarray:
        """Run ``batch`` as it is (one ``llama_decode``); its logits as :meth:`decode`'s."""
        rc = llama_cpp.llama_decode(self.ctx, batch.as_struct())
        if rc != 0:
            raise DecodeError(rc)
        if batch.n_outputs == 0:
            return np.empty((0, self.n_vocab), np.float32)
        return self._logits_view(batch.n_outputs)

    def _logits_view(self, n_outputs: int) -> np.ndarray:
        """llama.cpp's logits buffer as a numpy view, made once per (buffer, rows): making one
        costs ~50 us, a few % of a one-row step on a small model. The buffer moves only when
        a decode needs more output rows than it holds."""
        address = ctypes.cast(llama_cpp.llama_get_logits(self.ctx), ctypes.c_void_p).value
        if address != self._logits_address:
            self._logits_address, self._logits_views = address, {}
        view = self._logits_views.get(n_outputs)
        if view is None:
            array_type = ctypes.c_float * (n_outputs * self.n_vocab)
            view = np.frombuffer(array_type.from_address(address), np.float32).reshape(n_outputs, self.n_vocab)
            if len(self._logits_views) < LOGITS_VIEWS:
                self._logits_views[n_outputs] = view
        return view

    def pos_max(self, seq_id: int) -> int:
        """The last position ``seq_id`` holds in KV, -1 for none."""
        return llama_cpp.llama_memory_seq_pos_max(self.memory, seq_id)

    def time_rows(self, n: int) -> float:
        """Seconds of one decode of ``n`` tokens of sequence 0, every one an output row (as a
        draft's rows are); the cells are removed after. Only before any request runs."""
        self.batch.clear()
        self.batch.add_span(np.arange(n, dtype=np.int32) % self.n_vocab, 0, 0, True, output_all=True)
        t0 = time.perf_counter()
        try:
            self.decode()
            return time.perf_counter() - t0
        finally:
            self.remove(0)

    # -- KV operations (prefix_cache.KVOps) -------------------------------------------------

    def copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Add ``dst`` to the cells of ``src`` in ``[p0, p1)``; no data moves (unified KV)."""
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def copy_stream(self, src: int, dst: int) -> None:
        """Streams: make ``dst``'s stream a copy of ``src``'s (metadata now, the cells' data
        at the start of the next decode; llama.cpp copies whole streams only)."""
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        """Take ``seq_id`` off its cells in ``[p0, p1)``; a cell no sequence holds is free."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, p0, p1)

    # -- saved sequence state (the prefix trie's host and disk tiers) ------------------------

    @property
    def n_swa(self) -> int:
        """The sliding window of SWA layers (0 for none): a saved state holds only the last
        ``n_swa`` cells of those layers, so it can be continued from its end only."""
        return max(0, llama_cpp.llama_model_n_swa(self.model))

    def save_state(self, seq_id: int) -> bytearray | None:
        """A snapshot of every cell ``seq_id`` holds, or None if llama.cpp wrote nothing.

        Written straight into the buffer that is kept: a ctypes string buffer is zero-filled
        and then copied out, 10 ms of the 12 a 1,000-token save took (llama.cpp's own copy
        is 1 ms); a bytearray's zero pages cost nothing until llama.cpp writes them."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq_id)
        if size <= 0:
            return None
        buf = bytearray(size)
        dst = (ctypes.c_uint8 * size).from_buffer(buf)
        written = llama_cpp.llama_state_seq_get_data(self.ctx, dst, size, seq_id)
        del dst  # a bytearray with a live export cannot be resized
        if written <= 0:
            return None
        if written < size:
            del buf[written:]
        return buf

    def restore_state(self, data: bytes | bytearray, seq_id: int) -> bool:
        """Put a snapshot's cells back under ``seq_id`` (new cells; none are shared). False
        when llama.cpp refuses it (no contiguous room, or a state of another layout)."""
        if isinstance(data, bytearray):  # no copy either way
            src = ctypes.cast((ctypes.c_uint8 * len(data)).from_buffer(data), ctypes.POINTER(ctypes.c_uint8))
        else:
            src = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        if llama_cpp.llama_state_seq_set_data(self.ctx, src, len(data), seq_id) == len(data):
            return True
        self.remove(seq_id)  # a refused state may have left cells behind
        return False

    @staticmethod
    def system_info() -> str:
        """llama.cpp's build as it runs here: its backends and the CPU features it uses."""
        return llama_cpp.llama_print_system_info().decode("utf-8", "replace")

    def kv_fingerprint(self) -> str:
        """What a saved state depends on: the model's weights and every setting that changes
        the layout of the KV cells (types, V transposition with flash attention, SWA)."""
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, desc, len(desc))
        c = self.config
        parts = [
            _file_identity(c.model),
            desc.value.decode("utf-8", "replace"),
            str(llama_cpp.llama_model_n_params(self.model)),
            f"k={c.cache_type_k} v={c.cache_type_v} fa={c.flash_attn} swa_full=1 unified={int(not c.streams)}",
            f"llama_cpp={getattr(llama_cpp, '__version__', '?')}",
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def close(self) -> None:
        self.invariant = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


def _file_identity(path: str) -> str:
    """Size and a hash of the first and last MiB: the same weights wherever the file lies."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{size}:{h.hexdigest()}"


def _physical_cores() -> int:
    # llama.cpp's own default: physical cores; hyper-threads slow matrix kernels down.
    try:
        with open("/proc/cpuinfo") as f:
            cores = {line for line in f if line.startswith("core id")}
        siblings = len(os.sched_getaffinity(0))
        if cores:
            return max(1, min(len(cores), siblings))
        return max(1, siblings)
    except (OSError, AttributeError):
        return max(1, (os.cpu_count() or 2) // 2)
