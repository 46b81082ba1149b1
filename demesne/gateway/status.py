"""The endpoints about the service itself: /v1/models, /health, /metrics, /openapi.json."""

from __future__ import annotations

import importlib.resources
from collections import Counter, defaultdict

import orjson
from aiohttp import web

from .. import protocol as p
from .app_keys import CLIENT, MODELS, OBSERVABILITY, STARTED
from .generation import ModelContext
from .errors import ApiError


def json_response(obj, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def model_context(request: web.Request, model_id: str) -> ModelContext:
    """The served model a request names: 404 if no engine ever served it (503 while no engine
    is up to say), 503 while every engine of a known model is down."""
    models, client = request.app[MODELS], request.app[CLIENT]
    if model_id in client.models():  # a ready engine's model is loaded
        return models[model_id]
    if model_id in client.known_models or not client.any_alive():
        raise ApiError(503, client.why_unavailable(model_id), None, "engine_unavailable")
    raise ApiError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")


def _model_card(info: p.ModelInfo, created: int) -> dict:
    return {"id": info.id, "object": "model", "created": created, "owned_by": "demesne", "context_length": info.n_ctx}


async def list_models(request: web.Request) -> web.Response:
    created = int(request.app[STARTED])
    models = request.app[MODELS]
    cards = [_model_card(models[m].info, created) for m in sorted(request.app[CLIENT].models())]
    return json_response({"object": "list", "data": cards})


async def get_model(request: web.Request) -> web.Response:
    model = model_context(request, request.match_info["model"])
    return json_response(_model_card(model.info, int(request.app[STARTED])))


_OPENAPI = importlib.resources.files(__package__).joinpath("openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """The API as demesne serves it (demesne/gateway/openapi.json)."""
    return web.Response(body=_OPENAPI, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    engines = [
        {"endpoint": e.endpoint, "up": e.alive, "ready": e.routable, "draining": e.draining, "model": e.info.id if e.info else None, "refused": e.refused or e.handshake}
        for e in client.engines
    ]
    ok = client.any_alive()
    return json_response({"status": "ok" if ok else "unavailable", "engines": engines}, 200 if ok else 503)


_METRICS = {
    "requests_running": ("gauge", "Requests decoding in the engines"),
    "requests_waiting": ("gauge", "Requests queued in the engines"),
    "prompt_tokens_total": ("counter", "Prompt tokens of admitted requests"),
    "prompt_tokens_cached_total": ("counter", "Prompt tokens served from the prefix trie"),
    "prefill_tokens_total": ("counter", "Tokens decoded as prompt, recomputation included"),
    "generation_tokens_total": ("counter", "Tokens generated"),
    "decode_seconds_total": ("counter", "Seconds spent in llama_decode"),
    "sample_seconds_total": ("counter", "Seconds spent sampling"),
    "steps_total": ("counter", "Engine steps (one llama_decode each)"),
    "requests_finished_total": ("counter", "Requests finished in the engines"),
    "requests_refused_total": ("counter", "Requests the engines refused"),
    "requests_failed_total": ("counter", "Requests failed by a fault in their engine step"),
    "step_faults_total": ("counter", "Engine steps that raised or whose decode failed for good"),
    "longest_step_seconds": ("gauge", "The longest engine step so far"),
    "preemptions_total": ("counter", "Sequences preempted for lack of KV cells"),
    "kv_cells_used": ("gauge", "KV cells holding tokens"),
    "kv_cells_total": ("gauge", "KV cells in all"),
    "prefix_cache_nodes": ("gauge", "Nodes in the prefix trie"),
    "prefix_cache_cells": ("gauge", "KV cells the prefix trie holds"),
    "grammars_compiled_total": ("counter", "Grammars compiled by llguidance (the rest came from the engines' grammar caches)"),
    "constraint_masks_total": ("counter", "Token masks computed for constrained rows"),
    "constraint_refusals_total": ("counter", "Sampled tokens a grammar refused (the row was masked and sampled again)"),
    "constraint_mask_seconds_total": ("counter", "Seconds spent computing masks ahead, beside llama_decode"),
    "constraint_mask_wait_seconds_total": ("counter", "...of which steps waited for, after llama_decode had finished"),
    "step_pad_rows_total": ("counter", "Throwaway rows added to decode steps to make them cheaper (idle KV streams, --no-pad-steps to turn off)"),
    "spec_draft_tokens_total": ("counter", "Draft tokens fed for verification (speculative decoding)"),
    "spec_model_draft_tokens_total": ("counter", "...of which the draft model wrote (--draft-model; the rest came from n-grams)"),
    "spec_verified_tokens_total": ("counter", "...of which were verified (those after a draft's first miss are not)"),
    "spec_accepted_tokens_total": ("counter", "...of which the model's own sampling agreed with, and kept"),
    "spec_acceptance_rate": ("gauge", "Accepted draft tokens per verified one"),
    "deterministic_calls_total": ("counter", "llama_decode calls of batch-invariant shape (--deterministic)"),
    "deterministic_pad_tokens_total": ("counter", "...and the pad tokens they decoded to keep that shape"),
    "kv_restores_total": ("counter", "Saved prefixes restored into the KV cache (host or disk tier)"),
    "kv_restores_disk_total": ("counter", "...of which were read from the disk tier"),
    "kv_restored_tokens_total": ("counter", "Prompt tokens restored instead of recomputed"),
    "kv_restore_seconds_total": ("counter", "Seconds spent restoring saved prefixes"),
    "kv_restore_failures_total": ("counter", "Restores llama.cpp refused (the tokens were recomputed)"),
    "kv_saves_total": ("counter", "Prefixes saved as they left the KV cache"),
    "kv_saved_tokens_total": ("counter", "Tokens of the saved prefixes"),
    "kv_save_seconds_total": ("counter", "Seconds spent saving prefixes"),
    "kv_store_host_bytes": ("gauge", "Bytes of saved prefix state in host memory"),
    "kv_store_host_entries": ("gauge", "Saved prefixes in host memory"),
    "kv_store_disk_bytes": ("gauge", "Bytes of saved prefix state on disk"),
    "kv_store_disk_entries": ("gauge", "Saved prefixes on disk"),
    "kv_store_host_hits": ("counter", "Saved prefixes loaded from host memory"),
    "kv_store_disk_hits": ("counter", "Saved prefixes loaded from disk"),
    "kv_store_saves": ("counter", "Saved prefixes stored"),
    "kv_store_host_evictions": ("counter", "Saved prefixes evicted from host memory (to disk, if on)"),
    "kv_store_disk_evictions": ("counter", "Saved prefix files removed to keep the disk cap"),
    "kv_store_disk_write_errors": ("counter", "Disk tier write errors (the tier is then off)"),
    "kv_store_disk_corrupt": ("counter", "Disk tier files rejected as foreign, truncated or corrupt"),
    "kv_store_demotions_dropped": ("counter", "Saved prefixes dropped because the disk writer was behind"),
}


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: each engine's counters, asked for now, by engine."""
    client = request.app[CLIENT]
    await client.refresh_stats()
    lines = ["# HELP demesne_engine_up Whether the engine answers heartbeats", "# TYPE demesne_engine_up gauge"]
    lines += [f'demesne_engine_up{{engine="{e.endpoint}"}} {int(e.alive)}' for e in client.engines]
    lines += ["# HELP demesne_gateway_routed_total Requests this gateway sent to the engine", "# TYPE demesne_gateway_routed_total counter"]
    lines += [f'demesne_gateway_routed_total{{engine="{e.endpoint}"}} {e.routed}' for e in client.engines]
    lines += [
        "# HELP demesne_gateway_routed_prefix_tokens_total Prompt tokens the routing expected the engine to hold",
        "# TYPE demesne_gateway_routed_prefix_tokens_total counter",
    ]
    lines += [f'demesne_gateway_routed_prefix_tokens_total{{engine="{e.endpoint}"}} {e.routed_cached}' for e in client.engines]
    lines += request.app[OBSERVABILITY].lines()
    lines += _model_server_lines(client)
    for name, (kind, help_text) in _METRICS.items():
        lines += [f"# HELP demesne_{name} {help_text}", f"# TYPE demesne_{name} {kind}"]
        for e in client.engines:
            if name in e.stats:
                lines.append(f'demesne_{name}{{engine="{e.endpoint}"}} {e.stats[name]}')
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")



# The Model Server Protocol of the Gateway API Inference Extension (and so llm-d's scorers):
# vLLM's names, per model, summed over this gateway's live engines of it. A router balancing
# demesne gateways reads these with no adapter.
_MODEL_SERVER = (
    ("vllm:num_requests_running", "Requests decoding in this gateway's engines of the model"),
    ("vllm:num_requests_waiting", "Requests queued in this gateway's engines of the model"),
    ("vllm:kv_cache_usage_perc", "Share of the KV cache in use (1 is full), running requests and kept prefixes"),
    ("vllm:gpu_cache_usage_perc", "The same as vllm:kv_cache_usage_perc (its older name)"),
)


def _model_server_lines(client) -> list[str]:
    totals: dict[str, Counter] = defaultdict(Counter)
    for e in client.engines:
        if e.alive and not e.retired:
            totals[e.info.id].update({k: e.stats.get(k, 0) for k in ("requests_running", "requests_waiting", "kv_cells_used", "kv_cells_total")})
    lines = []
    for i, (name, help_text) in enumerate(_MODEL_SERVER):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for model, t in sorted(totals.items()):
            usage = t["kv_cells_used"] / t["kv_cells_total"] if t["kv_cells_total"] else 0.0
            value = (t["requests_running"], t["requests_waiting"], usage, usage)[i]
            lines.append(f'{name}{{model_name="{_label(model)}"}} {value:g}')
    return lines


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
