"""`make bench`: start `demesne serve`, run `demesne bench` at several concurrencies, compare.

Owns the server's lifetime for the run (start on a free port, wait for /health, SIGTERM in
the end) and the summary table. The measuring itself is `demesne.bench.run_bench`.

    python -m demesne.bench_suite --concurrency 1,8,16 -- --ctx-size 8192

Arguments after `--` go to `demesne serve` unchanged. The server's log goes to
`.bench/serve.log`, so it does not interleave with the figures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from demesne.bench import BenchResult, body_extras, format_result, run_bench

LOG_PATH = Path(".bench/serve.log")
STOP_TIMEOUT_S = 15


def free_port() -> int:
    """A TCP port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, extra: tuple[str, ...]) -> list[str]:
    """The `demesne serve` command line from this interpreter's environment."""
    script = Path(sys.prefix) / "bin" / "demesne"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "demesne"]
    return [*base, "serve", "--port", str(port), *extra]


def start_server(port: int, extra: tuple[str, ...]) -> subprocess.Popen:
    LOG_PATH.parent.mkdir(parents=True, exist_ok=True)
    cmd = serve_command(port, extra)
    click.echo(f"starting: {' '.join(cmd)}  (log: {LOG_PATH})", err=True)
    with open(LOG_PATH, "wb") as log:
        # Own session: Ctrl-C reaches the suite only, which then stops the server in order.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float) -> None:
    """Poll /health until 200; fail early if the server exits, loudly if it takes too long."""
    url = f"http://127.0.0.1:{port}/health"
    start = last_note = time.monotonic()
    click.echo(f"waiting for {url} (loading the model can take a while) ...", err=True)
    while not _healthy(url):
        if proc.poll() is not None:
            raise click.ClickException(f"demesne serve exited with {proc.returncode}:\n{_log_tail()}")
        now = time.monotonic()
        if now - start > timeout_s:
            raise click.ClickException(f"{url} not healthy after {timeout_s:.0f} s:\n{_log_tail()}")
        if now - last_note >= 10:
            click.echo(f"  still waiting ({now - start:.0f} s) ...", err=True)
            last_note = now
        time.sleep(0.5)
    click.echo(f"server ready after {time.monotonic() - start:.1f} s", err=True)


def _log_tail(lines: int = 30) -> str:
    try:
        return "\n".join(LOG_PATH.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to the whole group if it has not gone within STOP_TIMEOUT_S."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        click.echo("server did not stop after SIGTERM; killing it", err=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def summary_table(results: list[BenchResult]) -> str:
    """One row per concurrency; speed-up is against concurrency 1, or the first run."""
    base = next((r for r in results if r.concurrency == 1), results[0]).output_tok_s
    rows = [f"{'conc':>5} {'tok/s':>9} {'speed-up':>9} {'TTFT p50':>10} {'ITL p50':>9} {'failed':>7}"]
    for r in results:
        speedup = r.output_tok_s / base if base > 0 else 0.0
        rows.append(
            f"{r.concurrency:>5} {r.output_tok_s:>9.1f} {speedup:>8.2f}x "
            f"{_ms(r.ttft(50)):>10} {_ms(r.itl(50)):>9} {len(r.failed):>7}"
        )
    return "\n".join(rows)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}ms"


def _parse_levels(_ctx, _param, value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers, e.g. 1,8,16")
    if not levels or min(levels) < 1:
        raise click.BadParameter("concurrencies must be positive integers")
    return levels


async def run_levels(url: str, levels: list[int], n_requests: int | None, **kwargs) -> list[BenchResult]:
    results = []
    for c in levels:
        n = n_requests or max(2 * c, 8)
        click.echo(f"\n== concurrency {c}, {n} requests ==")
        result = await run_bench(url, concurrency=c, requests=n, **kwargs)
        click.echo(format_result(result))
        results.append(result)
    return results


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--concurrency", "levels", default="1,8,16", show_default=True, callback=_parse_levels,
              help="Comma-separated concurrency levels, run in turn.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=None,
              help="Requests per level [default: max(2*concurrency, 8)].")
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--shared-prefix-tokens", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True)
@click.option("--tool-choice", type=click.Choice(["auto", "required"]), default=None,
              help="Chat only: offer two tools with this tool_choice.")
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--api-key", envvar="DEMESNE_API_KEY", default=None, help="Bearer token (env DEMESNE_API_KEY).")
@click.option("--health-timeout", default=300.0, show_default=True, help="Seconds to wait for /health.")
@click.option("--no-progress", is_flag=True, help="Do not draw progress bars.")
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def main(levels, n_requests, prompt_tokens, shared_prefix_tokens, max_tokens, endpoint, tool_choice, temperature,
         api_key, health_timeout, no_progress, serve_args):
    """Start `demesne serve`, benchmark it at each concurrency, print a summary, stop it."""
    if tool_choice and endpoint != "chat":
        raise click.UsageError("--tool-choice needs --endpoint chat")
    port = free_port()
    proc = start_server(port, serve_args)
    try:
        wait_healthy(proc, port, health_timeout)
        results = asyncio.run(run_levels(
            f"http://127.0.0.1:{port}/v1", levels, n_requests, prompt_tokens=prompt_tokens,
            shared_prefix_tokens=shared_prefix_tokens, max_tokens=max_tokens, api_key=api_key,
            temperature=temperature, endpoint=endpoint, extras=body_extras(tool_choice), progress=not no_progress,
        ))
        click.echo("\n== summary ==\n" + summary_table(results))
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
