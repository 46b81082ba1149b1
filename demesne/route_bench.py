"""Prefix-aware against round-robin routing over several engines of one model, side by side.

    python -m demesne.route_bench --engines 2 --rounds 2

For each round and each policy (the order alternates between rounds, since machines drift):
start ``--engines`` engines on IPC sockets and one gateway with ``--route POLICY``, run the
workloads, stop them all, so each run starts with empty caches. Two workloads, both
shared-prefix: single requests whose prompts start with one of ``--prefixes`` system prompts,
interleaved; and multi-turn conversations, each with its own system prompt and resending its
history every turn. Printed per run and as medians: prefill tokens the engines computed
(their counters) and TTFT.

Arguments after ``--`` go to every ``demesne-engine`` (e.g. ``-- --threads 1``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import click

from .bench import ConversationSpec, engine_prefill_tokens, run_bench, run_conversations
from .bench_suite import free_port, stop_server

BIN = Path(sys.executable).parent


def _start(directory: Path, engines: int, route: str, slack: int, engine_args: tuple[str, ...]) -> tuple[list[subprocess.Popen], str]:
    procs, endpoints = [], []
    for i in range(engines):
        endpoint = f"ipc://{directory}/engine-{i}.sock"
        endpoints.append(endpoint)
        log = open(directory / f"engine-{i}-{route}.log", "wb")
        procs.append(subprocess.Popen([str(BIN / "demesne-engine"), "--listen", endpoint, *engine_args], stdout=log, stderr=subprocess.STDOUT))
    port = free_port()
    args = ["--port", str(port), "--route", route, "--route-slack", str(slack)] + [a for e in endpoints for a in ("--engine", e)]
    log = open(directory / f"gateway-{route}.log", "wb")
    procs.append(subprocess.Popen([str(BIN / "demesne-gateway"), *args], stdout=log, stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200 and _all_ready(url, engines):
                    return procs, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise click.ClickException(f"engines not up after 300 s; logs in {directory}")


def _all_ready(url: str, engines: int) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
        return sum(e["ready"] for e in json.load(r)["engines"]) == engines


async def _workloads(url: str, opts: dict) -> dict[str, tuple[int, float, float]]:
    """{workload: (prefill tokens, TTFT p50, TTFT p90)}."""
    out = {}
    async with aiohttp.ClientSession() as session:
        before = await engine_prefill_tokens(session, f"{url}/v1", None)
        single = await run_bench(
            f"{url}/v1", concurrency=opts["concurrency"], requests=opts["requests"], prompt_tokens=opts["prompt_tokens"],
            shared_prefix_tokens=opts["shared_prefix_tokens"], prefixes=opts["prefixes"], max_tokens=opts["max_tokens"],
            progress=False,
        )
        middle = await engine_prefill_tokens(session, f"{url}/v1", None)
        out["prefixes"] = (middle - before, single.ttft(50), single.ttft(90))
        spec = ConversationSpec(opts["conversations"], opts["turns"], opts["system_tokens"], 45)
        talk = await run_conversations(f"{url}/v1", spec, concurrency=opts["concurrency"], max_tokens=opts["max_tokens"], progress=False)
        out["conversations"] = (talk.engine_prefill, talk.ttft(50), talk.ttft(90))
    if single.failed or talk.failed:
        raise click.ClickException(f"requests failed: {(single.failed + talk.failed)[:3]}")
    return out


@click.command()
@click.option("--engines", default=2, show_default=True, type=click.IntRange(min=2))
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--route-slack", "slack", default=4, show_default=True, help="the gateway's --route-slack for prefix-aware routing")
@click.option("--concurrency", default=8, show_default=True)
@click.option("--requests", default=48, show_default=True)
@click.option("--prefixes", default=4, show_default=True, help="system prompts of the single-request workload")
@click.option("--shared-prefix-tokens", default=400, show_default=True)
@click.option("--prompt-tokens", default=440, show_default=True)
@click.option("--conversations", default=8, show_default=True)
@click.option("--turns", default=3, show_default=True)
@click.option("--system-tokens", default=400, show_default=True)
@click.option("--max-tokens", default=16, show_default=True)
@click.argument("engine_args", nargs=-1, type=click.UNPROCESSED)
def main(engines, rounds, slack, engine_args, **opts):
    """Run both routing policies side by side and print prefill tokens and TTFT."""
    results: dict[str, list[dict]] = {"prefix": [], "round-robin": []}
    with tempfile.TemporaryDirectory(prefix="demesne-route-") as tmp:
        for r in range(rounds):
            for route in (("prefix", "round-robin") if r % 2 == 0 else ("round-robin", "prefix")):
                procs, url = _start(Path(tmp), engines, route, slack, engine_args)
                try:
                    figures = asyncio.run(_workloads(url, opts))
                finally:
                    for proc in reversed(procs):
                        stop_server(proc)
                results[route].append(figures)
                for name, (prefill, p50, p90) in figures.items():
                    click.echo(f"round {r + 1} {route:<11} {name:<13} prefill {prefill:>7} tokens  TTFT p50 {p50 * 1000:7.0f} ms  p90 {p90 * 1000:7.0f} ms")
    click.echo("\nmedians over rounds")
    for name in ("prefixes", "conversations"):
        row = {}
        for route, runs in results.items():
            row[route] = [statistics.median(run[name][k] for run in runs) for k in range(3)]
        (pp, p50, p90), (rp, r50, r90) = row["prefix"], row["round-robin"]
        click.echo(
            f"{name:<13} prefill: prefix-aware {pp:.0f} vs round-robin {rp:.0f} tokens ({rp / max(pp, 1):.2f}x)  "
            f"TTFT p50 {p50 * 1000:.0f} vs {r50 * 1000:.0f} ms  p90 {p90 * 1000:.0f} vs {r90 * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
