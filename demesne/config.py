"""Frozen configuration for each process, checked once in ``__post_init__`` and passed down."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from .model import cache_dir

CACHE_TYPES = ("f16", "q8_0", "q4_0")
SPLIT_MODES = ("none", "layer", "row")
FLASH_ATTN = ("auto", "on", "off")
KV_LAYOUTS = ("streams", "unified")  # engine/slots.py, engine/scheduler.py
SPECULATIVE = ("ngram", "off")  # engine/speculate.py
ROUTES = ("prefix", "round-robin")  # gateway/routing.py
TOOL_FORMATS = ("auto", "hermes", "llama3", "mistral", "mistral-v11", "generic")  # gateway/tool_formats.py


def runtime_base() -> str | None:
    """``$XDG_RUNTIME_DIR`` where it names a directory this user may use, else None.

    ``su``, ``sudo`` and remote shells can leave it naming another session's directory, or one
    that no longer exists: then the temporary directory is used, as the XDG spec says to.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    return base if base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK) else None


def default_dir() -> str:
    """Where engine sockets go by default: a directory only this user may enter (sockets.py)."""
    base = runtime_base()
    return os.path.join(base, "demesne") if base else os.path.join(tempfile.gettempdir(), f"demesne-{os.getuid()}")


def default_step_costs_file() -> str:
    return str(cache_dir() / "step-costs.json")


def default_engine_endpoint() -> str:
    return f"ipc://{default_dir()}/engine.sock"


KEEP_WITH_TIERS = 0.25  # --prefix-keep's default when the host tier is on (measured: see tiers.py)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2 << 30  # not Linux: assume little


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``4G``, ``1.5GiB``, ``0`` (no suffix: bytes)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (e.g. 512M, 4G, 0)") from None
    if not 0 <= value < 1 << 50:
        raise ConfigError(f"not a size: {text!r}")
    return int(value * units[unit])


class ConfigError(ValueError):
    """A setting that cannot work; the CLI prints it as one line and exits with code 2."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def _check_file(path: str | None, flag: str) -> None:
    _require(path is None or os.path.isfile(path), f"{flag} {path}: no such file")


LINK_TIMEOUT = 1.5  # seconds of unacknowledged TCP data that mean the link to a peer is cut


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str  # path to a GGUF file
    model_alias: str | None = None  # the id clients use; default: the file's stem
    ctx_size: int = 32768  # total KV cells (streams: ctx_size / max_seqs for each sequence)
    max_seqs: int = 8  # sequences decoding at once
    kv_layout: str = "streams"  # one KV stream per sequence, or one unified cell pool
    batch_size: int = 2048  # tokens per llama_decode (decode rows + prefill chunk), as llama-server
    ubatch_size: int = 512
    threads: int = 0  # 0: one per physical core, as llama.cpp picks
    threads_batch: int = 0
    n_gpu_layers: int = 0  # -1: all
    split_mode: str = "layer"
    tensor_split: tuple[float, ...] = ()
    main_gpu: int = 0
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    listen: str = field(default_factory=default_engine_endpoint)
    max_waiting: int = 1024  # requests queued beyond this are refused with 429
    seed: int | None = None  # engine-wide seed for requests that bring none
    prefix_cache: bool = True  # share and keep KV of common prefixes (the radix trie)
    prefix_keep: float | None = None  # share of the KV cache finished sequences' prefixes may keep
    # Tiers below the KV cache (engine/tiers.py): saved prefix state in host memory (bytes;
    # None: a share of free RAM, 0: off) and, optionally, on disk.
    host_cache: int | None = None
    disk_cache: str | None = None
    disk_cache_size: int = 16 << 30
    step_target: float = 0.5  # seconds a step aims at while streams decode (prompt chunks shrink)
    speculative: str = "ngram"  # drafts verified in the batch (speculate.py), or "off"
    draft_max: int = 16  # the most draft tokens a sequence feeds in one step
    draft_model: str | None = None  # a small GGUF of the same vocabulary: drafts where n-grams have none
    deterministic: bool = False  # batch-invariant step shapes (engine/invariant.py)
    pad_steps: bool = True  # streams: throwaway rows where they make a decode step cheaper (engine/padding.py)
    # Step costs measured at start, kept for the next start of the same set-up (engine/costs_file.py); None: off.
    step_costs_file: str | None = field(default_factory=default_step_costs_file)
    drain_timeout: float = 60.0  # on SIGTERM: seconds to finish running requests before exiting
    gateway_timeout: float = 30.0  # a gateway silent this long is gone: its requests are failed
    # CURVE (curve.py): this engine's secret key file and the directory of gateways' public keys.
    curve_key: str | None = None
    curve_clients: str | None = None
    insecure: bool = False  # TCP without keys, on a network trusted for it
    link_timeout: float = LINK_TIMEOUT

    def __post_init__(self) -> None:
        _require(self.ctx_size >= 256, f"--ctx-size must be at least 256, got {self.ctx_size}")
        # llama.cpp takes 256 sequence ids; the prefix trie's nodes use those beyond max_seqs.
        _require(1 <= self.max_seqs <= 64, f"--max-seqs must be in [1, 64], got {self.max_seqs}")
        _require(
            self.batch_size >= self.max_seqs,
            f"--batch-size ({self.batch_size}) must be at least --max-seqs ({self.max_seqs}):"
            " every running sequence needs a row in each step",
        )
        _require(1 <= self.ubatch_size, "--ubatch-size must be positive")
        _require(self.kv_layout in KV_LAYOUTS, f"--kv-layout must be one of {KV_LAYOUTS}")
        _require(
            self.kv_layout != "streams" or self.ctx_size // self.max_seqs >= 64,
            f"--ctx-size ({self.ctx_size}) / --max-seqs ({self.max_seqs}) leaves each sequence"
            " fewer than 64 cells; raise --ctx-size or use --kv-layout unified",
        )
        _require(self.threads >= 0 and self.threads_batch >= 0, "--threads must be >= 0")
        _require(self.split_mode in SPLIT_MODES, f"--split-mode must be one of {SPLIT_MODES}")
        _require(self.flash_attn in FLASH_ATTN, f"--flash-attn must be one of {FLASH_ATTN}")
        for name, value in (("k", self.cache_type_k), ("v", self.cache_type_v)):
            _require(value in CACHE_TYPES, f"--cache-type-{name} must be one of {CACHE_TYPES}")
        _require(all(x >= 0 for x in self.tensor_split), "--tensor-split takes non-negative numbers")
        _require(self.max_waiting >= 1, "--max-waiting must be positive")
        _require(self.prefix_keep is None or 0.0 <= self.prefix_keep <= 1.0, f"--prefix-keep must be in [0, 1], got {self.prefix_keep}")
        _require(self.host_cache is None or self.host_cache >= 0, "--host-cache must be >= 0")
        _require(self.disk_cache_size >= 0, "--disk-cache-size must be >= 0")
        _require(self.disk_cache is None or self.tiers_on, "--disk-cache needs the host tier (--host-cache > 0) and the prefix cache")
        _require(self.step_target >= 0, "--step-target must be >= 0 (0: no time budget)")
        _require(self.speculative in SPECULATIVE, f"--speculative must be one of {SPECULATIVE}")
        _require(1 <= self.draft_max <= 64, f"--draft-max must be in [1, 64], got {self.draft_max}")
        _check_file(self.draft_model, "--draft-model")
        _require(self.draft_model is None or self.speculative != "off", "--draft-model drafts for speculative decoding: it cannot go with --speculative off")
        if self.deterministic:  # engine/invariant.py says why
            _require(
                self.streams,
                "--deterministic needs --kv-layout streams: in the unified cell pool a sequence's next"
                " cell goes wherever another one freed a cell, and attention sums cells in cell order",
            )
            _require(
                self.flash_attn != "off",
                "--deterministic needs flash attention (--flash-attn auto or on): without it attention"
                " sums depend on where a sequence's cells lie",
            )
            _require(
                min(self.ubatch_size, self.batch_size) >= max(64, 8 * self.max_seqs),
                "--deterministic needs --ubatch-size and --batch-size of at least 64 and 8 x --max-seqs"
                " (a step's decode rows, padded to a multiple of 8, go in one llama_decode)",
            )
        _require(self.drain_timeout >= 0, "--drain-timeout must be >= 0")
        _require(self.gateway_timeout >= 2, "--gateway-timeout must be at least 2 s (gateways ping every 0.5 s)")
        _require(
            (self.curve_key is None) == (self.curve_clients is None),
            "--curve-key and --curve-clients go together: the engine's key pair and the gateways it admits",
        )
        _check_file(self.curve_key, "--curve-key")
        _require(
            not is_tcp(self.listen) or self.curve_key is not None or self.insecure,
            f"--listen {self.listen} is TCP: give --curve-key and --curve-clients (demesne keygen), or"
            " --insecure if anyone who can reach the port may use this engine",
        )
        _require(0 <= self.link_timeout <= 600, "--link-timeout must be in [0, 600] seconds (0: the system's)")

    @property
    def streams(self) -> bool:
        return self.kv_layout == "streams"

    @property
    def tiers_on(self) -> bool:
        return self.prefix_cache and self.host_cache != 0

    def host_cache_bytes(self) -> int:
        """--host-cache, or by default a quarter of the memory free now, at most 8 GiB."""
        if self.host_cache is not None:
            return self.host_cache if self.prefix_cache else 0
        return min(_mem_available() // 4, 8 << 30) if self.prefix_cache else 0

    def kept_share(self) -> float:
        """--prefix-keep, or by default: with the tiers a finished conversation's cells move
        to host memory (every cell kept in the KV cache slows every decode step); without
        them the KV cache is the only place they can stay."""
        if self.prefix_keep is not None:
            return self.prefix_keep
        return KEEP_WITH_TIERS if self.tiers_on else 0.25

    @property
    def model_id(self) -> str:
        return self.model_alias or os.path.splitext(os.path.basename(self.model))[0]


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    engines: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 9090
    api_keys: tuple[str, ...] = ()
    engines_file: str | None = None  # more engines, one per line (`ENDPOINT [KEY]`), re-read on SIGHUP
    chat_template: str | None = None  # a Jinja file overriding every model's template
    tool_format: str = "auto"  # how the models write tool calls; auto: detected from each template
    # Per model id, overriding the two above: ((model id, Jinja file), ...), ((model id, format), ...)
    model_templates: tuple[tuple[str, str], ...] = ()
    model_tool_formats: tuple[tuple[str, str], ...] = ()
    max_body_bytes: int = 8 * 1024 * 1024
    heartbeat_interval: float = 0.5
    # An engine silent this long gets no new requests (its running ones keep waiting: only a
    # closed connection fails them). Engines answer heartbeats mid-step, so this is short.
    heartbeat_timeout: float = 3.0
    route_slack: int = 4  # a prefix match may send a request to an engine this much busier
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call (CORS); "*" for any
    write_timeout: float = 30.0  # a streaming client that takes no bytes this long is cut off
    request_timeout: float = 0.0  # longest a completion may run, then it ends as "length" (0: no limit)
    response_store: int = 1000  # /v1/responses kept for previous_response_id (LRU; 0: none)
    reasoning_format: str = "auto"  # split <think> blocks out of replies: auto (template writes them), deepseek, none
    route: str = "prefix"  # how a request's engine is chosen among those of its model
    # CURVE (curve.py): this gateway's secret key file, and the public key of the engines on TCP
    # (each line of --engines-file may name its own).
    curve_key: str | None = None
    engine_key: str | None = None
    insecure: bool = False  # TCP engines without keys, on a network trusted for it
    link_timeout: float = LINK_TIMEOUT
    vocab_cache: str | None = None  # where vocabularies from engines are kept (default: the cache dir)
    public_metrics: bool = False  # /metrics without an API key (Prometheus, inference routers)

    def __post_init__(self) -> None:
        _require(len(self.engines) > 0 or self.engines_file is not None, "at least one --engine endpoint (or --engines-file) is needed")
        _check_file(self.engines_file, "--engines-file")
        _check_file(self.curve_key, "--curve-key")
        _check_file(self.engine_key, "--engine-key")
        _require(self.route in ROUTES, f"--route must be one of {ROUTES}")
        _require(0 <= self.link_timeout <= 600, "--link-timeout must be in [0, 600] seconds (0: the system's)")
        for endpoint in self.engines:
            self.check_engine(endpoint, self.engine_key)
        _require(0 <= self.port < 65536, f"--port must be in [0, 65535], got {self.port}")
        _require(all(self.api_keys), "an API key may not be empty")
        _require(
            self.heartbeat_timeout > self.heartbeat_interval > 0,
            f"--heartbeat-timeout must exceed the heartbeat interval ({self.heartbeat_interval} s)",
        )
        _require(self.route_slack >= 0, "--route-slack must be >= 0")
        _require(0 < self.write_timeout <= 1e6, "--write-timeout must be in (0, 1e6] seconds")
        _require(0 <= self.request_timeout <= 1e6, "--request-timeout must be in [0, 1e6] seconds (0: no limit)")
        _require(all(self.cors_origins), "a --cors-origin may not be empty")
        _require(0 <= self.response_store <= 10_000_000, "--response-store must be in [0, 10000000]")
        _require(self.reasoning_format in ("auto", "deepseek", "none"), "--reasoning-format must be auto, deepseek or none")
        for model, fmt in (("", self.tool_format), *self.model_tool_formats):
            _require(fmt in TOOL_FORMATS, f"--tool-format {model + '=' if model else ''}{fmt}: must be one of {TOOL_FORMATS}")
        for model, path in (("", self.chat_template), *self.model_templates):
            _require(path is None or os.path.isfile(path), f"--chat-template {model + '=' if model else ''}{path}: no such file")
        if self.engines_file is not None:
            self.engine_list()  # checked now; a bad file on SIGHUP is logged and ignored

    def template_for(self, model_id: str) -> str | None:
        """The Jinja file overriding this model's own chat template, if one does."""
        return dict(self.model_templates).get(model_id, self.chat_template)

    def tool_format_for(self, model_id: str) -> str:
        return dict(self.model_tool_formats).get(model_id, self.tool_format)

    def check_engine(self, endpoint: str, key: str | None) -> None:
        """An engine this gateway may connect to: on TCP, with CURVE keys unless --insecure."""
        _require("://" in endpoint, f"not an engine endpoint: {endpoint!r} (e.g. tcp://10.0.0.5:5700, ipc:///run/demesne/engine-0.sock)")
        if key is not None:
            _require(self.curve_key is not None, f"engine {endpoint} has a public key: give this gateway's own --curve-key too")
            _check_file(key, f"the key of engine {endpoint}")
        _require(
            not is_tcp(endpoint) or key is not None or self.insecure,
            f"engine {endpoint} is on TCP: give --curve-key and --engine-key (demesne keygen), or --insecure"
            " on a trusted network",
        )

    def engine_list(self) -> list[tuple[str, str | None]]:
        """Every engine to connect to, with its public key file: --engine, then --engines-file
        (read now; each line ``ENDPOINT [KEYFILE]``, ``#`` comments)."""
        listed = [(endpoint, self.engine_key) for endpoint in self.engines]
        if self.engines_file is not None:
            try:
                with open(self.engines_file) as f:
                    lines = f.read().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read --engines-file {self.engines_file}: {exc.strerror}") from None
            for number, line in enumerate(lines, 1):
                words = line.split("#", 1)[0].split()
                if not words:
                    continue
                _require(len(words) <= 2, f"{self.engines_file}:{number}: expected `ENDPOINT [KEYFILE]`")
                key = words[1] if len(words) == 2 else self.engine_key
                try:
                    self.check_engine(words[0], key)
                except ConfigError as exc:
                    raise ConfigError(f"{self.engines_file}:{number}: {exc}") from None
                listed.append((words[0], key))
        endpoints = [e for e, _ in listed]
        duplicate = next((e for e in endpoints if endpoints.count(e) > 1), None)
        _require(duplicate is None, f"engine {duplicate} is listed twice")
        return listed
