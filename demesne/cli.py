"""Command line: `demesne serve`, `demesne bench`, `demesne-engine`, `demesne-gateway`.

`demesne serve` runs one engine (a child process) and one gateway (this process) on an IPC
socket; the two separate commands are for systemd units and for several GPUs or hosts.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

import click

from .bench import bench
from .config import CACHE_TYPES, FLASH_ATTN, KV_LAYOUTS, ROUTES, SPECULATIVE, SPLIT_MODES, TOOL_FORMATS, ConfigError, EngineConfig, GatewayConfig, default_engine_endpoint, default_step_costs_file, parse_size
from .model import ModelNotFound, resolve_model

log = logging.getLogger("demesne")


def _fail(message: str) -> None:
    click.echo(f"demesne: error: {message}", err=True)
    sys.exit(2)


def _floats(_ctx, _param, value: str | None) -> tuple[float, ...]:
    if not value:
        return ()
    try:
        return tuple(float(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter("expected numbers separated by commas, e.g. 3,1") from None


def _size(_ctx, _param, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _apply(options: list[Callable]) -> Callable:
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


LOG_LEVEL = click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)

ENGINE_OPTIONS = [
    click.option("--model", type=click.Path(dir_okay=False), help="GGUF to serve [default: the bundled Gemma 3 270M]"),
    click.option("--model-alias", help="model id clients use [default: the file name without .gguf]"),
    click.option("--ctx-size", default=32768, show_default=True, help="total KV cells; with --kv-layout streams each sequence may hold --ctx-size / --max-seqs of them"),
    click.option("--max-seqs", default=8, show_default=True, help="sequences decoding at once"),
    click.option("--kv-layout", default="streams", type=click.Choice(KV_LAYOUTS), show_default=True, help="streams: a KV stream per sequence (each step attends over its own cells; shared prefixes are copied); unified: one cell pool (any sequence may use the whole --ctx-size; shared prefixes share cells, but every step attends over every used cell)"),
    click.option("--batch-size", default=2048, show_default=True, help="tokens per decode step (decode rows + prompt chunk; the step-time budget shrinks chunks while streams decode)"),
    click.option("--ubatch-size", default=512, show_default=True, help="physical batch size inside llama.cpp"),
    click.option("--threads", default=0, show_default=True, help="threads for generation [0: physical cores]"),
    click.option("--threads-batch", default=0, show_default=True, help="threads for prompt processing [0: --threads]"),
    click.option("--n-gpu-layers", default=0, show_default=True, help="layers offloaded to the GPU [-1: all]"),
    click.option("--split-mode", default="layer", type=click.Choice(SPLIT_MODES), show_default=True, help="how to split across GPUs"),
    click.option("--tensor-split", callback=_floats, help="proportions per GPU, e.g. 3,1"),
    click.option("--main-gpu", default=0, show_default=True, help="the GPU for the whole model with --split-mode none"),
    click.option("--flash-attn", default="auto", type=click.Choice(FLASH_ATTN), show_default=True),
    click.option("--cache-type-k", default="f16", type=click.Choice(CACHE_TYPES), show_default=True, help="K cache type"),
    click.option("--cache-type-v", default="f16", type=click.Choice(CACHE_TYPES), show_default=True, help="V cache type (quantized needs flash attention)"),
    click.option("--max-waiting", default=1024, show_default=True, help="queued requests beyond this are refused with 429"),
    click.option("--seed", type=int, help="engine-wide seed for requests that bring none"),
    click.option("--prefix-keep", type=float, default=None, help="--kv-layout unified: share of the KV cache that prefixes of finished requests may keep (each kept cell widens every decode step's attention) [default: 0.25]"),
    click.option("--host-cache", callback=_size, help="host memory for saved prefix KV below the KV cache, e.g. 4G (0: off) [default: a quarter of free RAM, at most 8G]"),
    click.option("--disk-cache", type=click.Path(file_okay=False), help="directory for saved prefix KV evicted from host memory; kept across restarts and shared by engines of the same model and KV settings [default: off]"),
    click.option("--disk-cache-size", callback=_size, default="16G", show_default=True, help="the most the --disk-cache directory may hold"),
    click.option("--step-target", default=0.5, show_default=True, help="seconds a step aims at while streams decode: long prompts are fed in chunks that fit (0: no time budget)"),
    click.option("--speculative", default="ngram", type=click.Choice(SPECULATIVE), show_default=True, help="draft tokens from n-grams of each request's own prompt and output, verified in the batch (exact: outputs keep the model's distribution); used only where the measured step costs say it pays"),
    click.option("--draft-max", default=16, show_default=True, help="the most draft tokens a request feeds in one step"),
    click.option("--draft-model", type=click.Path(dir_okay=False), help="a small GGUF of the same vocabulary that drafts where a request's own n-grams have no guess (used where its measured cost pays)"),
    click.option("--deterministic", is_flag=True, help="reproducible outputs under any load: every step in a batch shape that leaves each request's logits unchanged by the others (greedy and seeded requests give the same bytes alone or beside others); checked at start, refused where this build's kernels do not keep it; needs --kv-layout streams"),
    click.option("--drain-timeout", default=60.0, show_default=True, help="on SIGTERM: seconds to finish running requests (new ones are refused) before exiting"),
    click.option("--gateway-timeout", default=30.0, show_default=True, help="seconds of silence after which a gateway is taken as gone and its requests are failed"),
    click.option("--no-prefix-cache", "prefix_cache", is_flag=True, flag_value=False, default=True, help="turn off prefix sharing and retention (for A/B measurements)"),
    click.option("--step-costs-file", type=click.Path(dir_okay=False), default=default_step_costs_file, help="where the step costs measured at start are kept for the next start of the same model, settings and machine, which times a few sizes again instead of all ('': measure at every start) [default: $XDG_CACHE_HOME/demesne/step-costs.json]"),
    click.option("--no-pad-steps", "pad_steps", is_flag=True, flag_value=False, default=True, help="turn off throwaway rows that make decode steps cheaper where the measured step costs say so (for A/B measurements)"),
]

GATEWAY_OPTIONS = [
    click.option("--host", default="127.0.0.1", show_default=True),
    click.option("--port", default=9090, show_default=True),
    click.option("--api-key", "api_keys", multiple=True, envvar="DEMESNE_API_KEY", help="accepted key (repeatable; env DEMESNE_API_KEY)"),
    click.option("--chat-template", "chat_template", multiple=True, metavar="[MODEL=]FILE", help="Jinja file overriding the models' chat template; MODEL=FILE for one model only (repeatable)"),
    click.option("--heartbeat-timeout", default=3.0, show_default=True, help="seconds without a heartbeat after which an engine gets no new requests (its running ones keep waiting; only a closed connection fails them)"),
    click.option("--tool-format", "tool_format", multiple=True, metavar="[MODEL=]FORMAT", help=f"how the models write tool calls: {', '.join(TOOL_FORMATS)} [default: auto, from each chat template]; MODEL=FORMAT for one model only (repeatable)"),
    click.option("--cors-origin", "cors_origins", multiple=True, help="browser origin allowed to call the API, e.g. https://app.example (repeatable; * for any) [default: none]"),
    click.option("--write-timeout", default=30.0, show_default=True, help="seconds a streaming client may take no bytes before its stream is closed and its requests aborted"),
    click.option("--reasoning-format", default="auto", type=click.Choice(["auto", "deepseek", "none"]), show_default=True, help="split <think>...</think> reasoning out of replies (reasoning_content, thinking blocks, reasoning items): auto when the chat template writes it, deepseek always, none never"),
    click.option("--response-store", default=1000, show_default=True, help="finished /v1/responses kept in memory for previous_response_id and GET (least recently used dropped; 0: none)"),
    click.option("--public-metrics", is_flag=True, help="serve /metrics without an API key (for Prometheus and Kubernetes inference routers; it shows model ids and load, no content)"),
    click.option("--request-timeout", default=0.0, show_default=True, help="seconds a completion may run before it ends with finish_reason length (0: no limit; a request's own 'timeout' may be shorter)"),
]


def _per_model(values: tuple[str, ...], default: str | None) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """``--flag VALUE`` (every model) and ``--flag MODEL=VALUE`` (one), repeatable: the last
    plain value, and the per-model pairs. A VALUE that is a path with '=' in it needs MODEL=."""
    plain, pairs = default, []
    for value in values:
        model, sep, rest = value.partition("=")
        if sep and model and "/" not in model:
            pairs.append((model, rest))
        else:
            plain = value
    return plain, tuple(pairs)


def _template_options(kw: dict) -> dict:
    """GatewayConfig's fields from the --chat-template and --tool-format values in ``kw``."""
    template, templates = _per_model(kw.pop("chat_template"), None)
    fmt, formats = _per_model(kw.pop("tool_format"), "auto")
    return {"chat_template": template, "model_templates": templates, "tool_format": fmt, "model_tool_formats": formats}


def _engine_config(model: str | None, listen: str, **kw) -> EngineConfig:
    kw.pop("log_level", None)
    if "step_costs_file" in kw:  # '': off
        kw["step_costs_file"] = kw["step_costs_file"] or None
    return EngineConfig(model=resolve_model(model), listen=listen, **kw)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_async(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


LINK_TIMEOUT = click.option("--link-timeout", default=1.5, show_default=True, help="TCP: seconds that sent data may go unacknowledged before the link is taken as cut and its requests fail (the kernel acknowledges for a busy process, so a slow step never trips it; 0: the system's)")
INSECURE = click.option("--insecure", is_flag=True, help="allow TCP without CURVE keys: anyone who can reach the port can use the engine")

# -- engine --------------------------------------------------------------------------------


def run_engine(config: EngineConfig, log_level: str = "info") -> None:
    """Body of an engine process (also the target of `demesne serve`'s child)."""
    from .engine.proc import serve_engine
    from .engine.runner import ModelLoadError

    _setup_logging(log_level)
    try:
        serve_engine(config)
    except (ModelLoadError, ConfigError) as exc:
        _fail(str(exc))


@click.command("engine")
@_apply(ENGINE_OPTIONS)
@click.option("--listen", default=default_engine_endpoint, show_default="ipc://$XDG_RUNTIME_DIR/demesne/engine.sock, else /tmp/demesne-$UID/engine.sock", help="ZeroMQ endpoint to bind")
@click.option("--curve-key", type=click.Path(dir_okay=False), help="this engine's secret key file (NAME.key_secret from `demesne keygen`): gateways reach it with CURVE, authenticated and encrypted")
@click.option("--curve-clients", type=click.Path(file_okay=False), help="directory of the public keys (*.key) of the gateways this engine admits")
@INSECURE
@LINK_TIMEOUT
@LOG_LEVEL
def engine_cmd(model, listen, log_level, **kw):
    """Run one engine: the model on one accelerator, behind a ZeroMQ socket."""
    try:
        config = _engine_config(model, listen, **kw)
    except (ConfigError, ModelNotFound) as exc:
        _fail(str(exc))
    run_engine(config, log_level)


# -- gateway -------------------------------------------------------------------------------


@click.command("gateway")
@_apply(GATEWAY_OPTIONS)
@click.option("--engine", "engines", multiple=True, show_default=default_engine_endpoint(), help="engine endpoint (repeatable) [default: the local one, unless --engines-file]")
@click.option("--engines-file", type=click.Path(dir_okay=False), help="more engines, one per line: `ENDPOINT [ENGINE_PUBLIC_KEY_FILE]` (# comments); re-read on SIGHUP: new engines are connected, unlisted ones finish their requests and are dropped")
@click.option("--route", default="prefix", type=click.Choice(ROUTES), show_default=True, help="how a request's engine is chosen among its model's: the one most likely to hold its prefix (weighed against load), or round-robin")
@click.option("--route-slack", default=4, show_default=True, help="with several engines: send a request to the engine holding more of its prefix unless it has this many more requests in flight than the least loaded")
@click.option("--curve-key", type=click.Path(dir_okay=False), help="this gateway's secret key file (NAME.key_secret from `demesne keygen`), for engines on TCP")
@click.option("--engine-key", type=click.Path(dir_okay=False), help="the public key file (NAME.key) of the engines on TCP (a line of --engines-file may name its own)")
@INSECURE
@LINK_TIMEOUT
@click.option("--vocab-cache", type=click.Path(file_okay=False), help="where vocabularies received from engines are kept [default: $XDG_CACHE_HOME/demesne/vocab]")
@click.option("--model", hidden=True, help="ignored: the gateway gets the vocabulary and template from its engines")
@LOG_LEVEL
def gateway_cmd(log_level, model, **kw):
    """Run one gateway: HTTP on the outside, engines over ZeroMQ on the inside.

    It needs no model file: each engine sends its model's vocabulary and chat template."""
    from .gateway.app import serve_gateway

    _setup_logging(log_level)
    if model:
        log.warning("--model is ignored: the gateway gets each model's vocabulary and template from its engines")
    if not kw["engines"] and not kw["engines_file"]:
        kw["engines"] = (default_engine_endpoint(),)
    try:
        templates = _template_options(kw)
        config = GatewayConfig(**{**kw, **templates, "engines": tuple(kw["engines"]), "api_keys": tuple(kw["api_keys"])})
    except ConfigError as exc:
        _fail(str(exc))
    _run_async(serve_gateway(config))


@click.command("keygen")
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("names", nargs=-1, required=True)
def keygen_cmd(directory, names):
    """Write CURVE key pairs for engines and gateways on TCP: DIRECTORY/NAME.key (public, to
    copy to the peers) and DIRECTORY/NAME.key_secret (mode 0600, stays on this host).

    \b
    Engine host:  demesne-engine --listen tcp://10.0.0.5:5700 --curve-key engine.key_secret --curve-clients gateways/
    Gateway host: demesne-gateway --engine tcp://10.0.0.5:5700 --curve-key gateway.key_secret --engine-key engine.key"""
    from .curve import keygen

    for name in names:
        try:
            public, secret = keygen(directory, name)
        except ConfigError as exc:
            _fail(str(exc))
        click.echo(f"{public}  (public: copy to the peers)\n{secret}  (secret: keep on this host)")


# -- serve: one engine and one gateway -----------------------------------------------------


@click.command("serve")
@_apply(ENGINE_OPTIONS + GATEWAY_OPTIONS)
@LOG_LEVEL
def serve_cmd(log_level, host, port, api_keys, chat_template, heartbeat_timeout, tool_format, cors_origins, write_timeout, public_metrics, request_timeout, response_store, reasoning_format, model, **engine_kw):
    """Run an engine and a gateway together on this machine (the bundled model by default).

    The engine runs as a child process and is restarted if it dies; SIGTERM drains it."""
    from .serve import private_endpoint, remove_dir, serve

    _setup_logging(log_level)
    endpoint, directory = private_endpoint()
    try:
        engine_config = _engine_config(model, endpoint, **engine_kw)
        gateway_config = GatewayConfig(
            engines=(endpoint,), host=host, port=port, api_keys=tuple(api_keys), **_template_options({"chat_template": chat_template, "tool_format": tool_format}),
            heartbeat_timeout=heartbeat_timeout, cors_origins=tuple(cors_origins), write_timeout=write_timeout, request_timeout=request_timeout,
            response_store=response_store, reasoning_format=reasoning_format, public_metrics=public_metrics,
        )
    except (ConfigError, ModelNotFound) as exc:
        remove_dir(directory)
        _fail(str(exc))
    code = 0
    try:
        code = _run_async(serve(engine_config, gateway_config, log_level))
    finally:
        remove_dir(directory)
    sys.exit(code)


# -- entry points --------------------------------------------------------------------------


@click.group()
@click.version_option(package_name="demesne")
def main():
    """demesne: an OpenAI-compatible LLM server on llama.cpp for ordinary hardware."""


main.add_command(serve_cmd)
main.add_command(engine_cmd)
main.add_command(gateway_cmd)
main.add_command(bench)
main.add_command(keygen_cmd)
engine_main = engine_cmd
gateway_main = gateway_cmd
