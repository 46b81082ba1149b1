"""What operators see of each request: latency histograms and response counts for
``/metrics`` (Prometheus text), and one access-log line per request on ``demesne.access``.

A completion request carries a :class:`RequestStats` (``request[STATS]``) that the routes and
the generation loop fill in as it runs; the HTTP middleware (app.py) times every request,
counts its status and writes the log line when it ends.

Queue time is measured here, in the gateway: from sending the request to an engine until its
first delta. The engine does not report its own queue time, so this includes the prompt's
prefill (and the round trip), and reads as an upper bound of the time spent waiting.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web

access_log = logging.getLogger("demesne.access")

STATS = "demesne.stats"  # request[STATS]: the RequestStats of a completion request

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_DURATION = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class Histogram:
    """A Prometheus histogram: cumulative ``_bucket{le=...}``, ``_sum`` and ``_count``."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += count
        self.sum += value * count

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for le, n in zip((*(f"{b:g}" for b in self.buckets), "+Inf"), self.counts):
            total += n
            out.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        out += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {total}"]
        return out


class Observability:
    """The gateway's own latency histograms and HTTP response counts."""

    def __init__(self) -> None:
        self.ttft = Histogram("demesne_time_to_first_token_seconds", "From request arrival to its first token", _LATENCY)
        self.itl = Histogram("demesne_inter_token_latency_seconds", "Between consecutive tokens of one choice", _TOKEN)
        self.duration = Histogram("demesne_request_duration_seconds", "Completion requests, arrival to last byte", _DURATION)
        self.queue = Histogram(
            "demesne_queue_time_seconds", "From sending to an engine until the first token (prefill included)", _LATENCY
        )
        self.responses: dict[str, int] = {}

    def lines(self) -> list[str]:
        out = ["# HELP demesne_http_responses_total HTTP responses by status", "# TYPE demesne_http_responses_total counter"]
        out += [f'demesne_http_responses_total{{status="{s}"}} {n}' for s, n in sorted(self.responses.items())]
        for histogram in (self.ttft, self.itl, self.duration, self.queue):
            out += histogram.lines()
        return out

    def finished(self, request: web.Request, status: int, started: float) -> None:
        """Count the response, observe a completion's latencies, write the access-log line."""
        now = time.monotonic()
        self.responses[str(status)] = self.responses.get(str(status), 0) + 1
        stats = request.get(STATS)
        line = f'{request.remote} "{request.method} {request.path}" {status} {now - started:.3f}s'
        if isinstance(stats, RequestStats):
            self.duration.observe(now - started)
            if stats.first_token is not None:
                self.ttft.observe(stats.first_token - started)
                if stats.sent is not None:
                    self.queue.observe(stats.first_token - stats.sent)
            line += " " + stats.describe(started)
        access_log.info("%s", line)


@dataclass(slots=True)
class RequestStats:
    """One completion request as it runs: its engine request ids, tokens and timings
    (``time.monotonic()``)."""

    observability: Observability
    rids: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    sent: float | None = None  # the first request sent to an engine
    first_token: float | None = None
    finish: list[str] = field(default_factory=list)

    def on_send(self, rid: str) -> None:
        self.rids.append(rid)
        if self.sent is None:
            self.sent = time.monotonic()

    def on_tokens(self, n: int, gap: float | None) -> None:
        """``n`` tokens of one choice arrived, ``gap`` seconds after its previous ones (None: its first)."""
        self.completion_tokens += n
        if self.first_token is None and n:
            self.first_token = time.monotonic()
        if gap is not None and n:
            self.observability.itl.observe(gap / n, n)

    def describe(self, started: float) -> str:
        def ms(t: float | None, since: float | None) -> str:
            return "-" if t is None or since is None else f"{(t - since) * 1000:.0f}ms"

        return (
            f"rid={','.join(self.rids) or '-'} prompt={self.prompt_tokens} cached={self.cached_tokens}"
            f" completion={self.completion_tokens} queue={ms(self.first_token, self.sent)}"
            f" ttft={ms(self.first_token, started)} finish={','.join(self.finish) or '-'}"
        )
