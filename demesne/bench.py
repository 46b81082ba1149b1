"""Load generator for any OpenAI-compatible server: `demesne bench`.

Owns the synthetic prompts (a shared prefix plus a distinct suffix per request, or
multi-turn conversations that resend their whole history each turn), the streaming client
that times each request, and the figures printed from those timings.
It speaks plain HTTP to `/completions` or `/chat/completions`, so it can measure demesne,
llama-server, vLLM or anything else that streams OpenAI-style SSE.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import click
import orjson
from tqdm import tqdm

# Short, common words: each is about one token in most vocabularies, so a prompt of N
# words is about N tokens without needing the server's tokenizer.
WORDS = (
    "the of and to in is it you that he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could "
    "people my than first water been call who oil its now find long down day did get come "
    "made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good man think say great where help through much "
    "before line right too mean old any same tell boy follow came want show also around form "
    "three small set put end does another well large must big even such because turn here "
    "why ask went men read need land different home us move try kind hand picture again "
    "change off play spell air away animal house point page letter mother answer found study "
    "still learn should world high every near add food between own below country plant last "
    "school father keep tree never start city earth eye light thought head under story saw "
    "left few while along might close something seem next hard open example begin life "
    "always those both paper together got group often run important until children side feet "
    "car mile night walk white sea began grow took river four carry state once book hear stop "
    "without second later miss idea enough eat face watch far real almost let above girl "
    "sometimes mountain cut young talk soon list song being leave family"
).split()

def build_prompts(n: int, prompt_tokens: int, shared_prefix_tokens: int, seed: int | str = 0, prefixes: int = 1) -> list[str]:
    """Return `n` prompts of about `prompt_tokens` words each.

    The first `shared_prefix_tokens` words are one of `prefixes` different prefixes (prompt i
    has prefix i mod `prefixes`: several system prompts, interleaved); the rest start with
    the request index, so no two suffixes are equal even where the random words collide.
    """
    shared = min(max(shared_prefix_tokens, 0), prompt_tokens)
    heads = [_words(random.Random(f"{seed}:prefix" + (f"{k}" if k else "")), shared) for k in range(max(prefixes, 1))]
    prompts = []
    for i in range(n):
        prefix = heads[i % len(heads)]
        suffix_len = max(prompt_tokens - shared - 1, 0)
        suffix = [str(i)] + _words(random.Random(f"{seed}:{i}"), suffix_len)
        prompts.append(" ".join(prefix + suffix))
    return prompts


def build_copy_prompts(n: int, prompt_tokens: int, seed: int | str = 0) -> list[str]:
    """Return `n` prompts that ask for a passage of code of about `prompt_tokens` words to be
    repeated with one name changed (a light edit: most of the output quotes the prompt, as
    code edits and quoting do). Each prompt has its own code."""
    prompts = []
    for i in range(n):
        rng = random.Random(f"{seed}:copy:{i}")
        lines, words = [], 0
        while words < prompt_tokens:
            name, a, b, c = _words(rng, 4)
            block = [f"def {name}_{i}({a}, {b}):", f"    {c} = {a} + {b}", f"    return {c} * {len(lines) + 2}", ""]
            lines += block
            words += 14
        code = "\n".join(lines)
        old = code.split("(", 1)[0][4:]
        prompts.append(
            f"Rewrite this code with the function {old} renamed to {old}_v2 and nothing else changed.\n\n"
            f"{code}\n\nThe same code with {old} renamed to {old}_v2:\n\n"
        )
    return prompts


def _words(rng: random.Random, k: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(k)]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class RequestStats:
    """What one streamed request measured. Times are in seconds."""

    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    chunks: int = 0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    latency: float = 0.0
    text: str = ""  # what the reply streamed, for a conversation's next turn

    @property
    def output_tokens(self) -> int:
        # Usage is authoritative; a server that sends none still sends one chunk per token
        # or more, so the chunk count is a lower bound.
        return self.completion_tokens if self.completion_tokens is not None else self.chunks


@dataclass
class BenchResult:
    """Every request's stats plus the settings and wall time of the run."""

    concurrency: int
    max_tokens: int
    prompt_tokens: int
    shared_prefix_tokens: int
    model: str
    wall_s: float
    requests: list[RequestStats]

    @property
    def ok(self) -> list[RequestStats]:
        return [r for r in self.requests if r.ok]

    @property
    def failed(self) -> list[RequestStats]:
        return [r for r in self.requests if not r.ok]

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.ok)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def req_s(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    def ttft(self, q: float) -> float | None:
        return _ttft(self.requests, q)

    def itl(self, q: float) -> float | None:
        return percentile([gap for r in self.ok for gap in r.itls], q)


def _ttft(requests: list[RequestStats], q: float) -> float | None:
    return percentile([r.ttft for r in requests if r.ok and r.ttft is not None], q)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def format_result(result: BenchResult) -> str:
    """A short human-readable report of one run."""
    lines = [
        f"model {result.model}  concurrency {result.concurrency}  "
        f"prompt ~{result.prompt_tokens} words (shared {result.shared_prefix_tokens})  "
        f"max_tokens {result.max_tokens}",
        *_summary_lines(result),
    ]
    prompt = _mean([r.prompt_tokens for r in result.ok if r.prompt_tokens is not None])
    if prompt is not None:
        lines.append(f"prompt tokens   {prompt:.1f} mean (from usage)")
    cached = _mean([r.cached_tokens for r in result.ok if r.cached_tokens is not None])
    if cached is not None:
        lines.append(f"cached tokens   {cached:.1f} mean per request")
    lines += _error_lines(result.failed)
    return "\n".join(lines)


def _summary_lines(result: BenchResult) -> list[str]:
    return [
        f"requests        {len(result.ok)} ok, {len(result.failed)} failed",
        f"wall time       {result.wall_s:.2f} s",
        f"output          {result.output_tokens} tokens, {result.output_tok_s:.1f} tok/s",
        f"throughput      {result.req_s:.2f} req/s",
        f"TTFT            p50 {_ms(result.ttft(50))}  p90 {_ms(result.ttft(90))}",
        f"inter-token     p50 {_ms(result.itl(50))}  p90 {_ms(result.itl(90))}",
    ]


def _error_lines(failed: list[RequestStats], limit: int = 5) -> list[str]:
    # Distinct messages only: 64 copies of the same 503 say no more than one.
    messages: dict[str, int] = {}
    for r in failed:
        msg = r.error or "unknown error"
        messages[msg] = messages.get(msg, 0) + 1
    return [f"error           {n}x {msg}" for msg, n in list(messages.items())[:limit]]


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_model(session: aiohttp.ClientSession, url: str, api_key: str | None) -> str:
    """The first model id the server lists."""
    async with session.get(f"{url}/models", headers=_headers(api_key)) as resp:
        resp.raise_for_status()
        body = await resp.json(loads=orjson.loads)
    return body["data"][0]["id"]


# The tools a --tool-choice run offers: one with a nested, constrained argument object.
BENCH_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up facts about a place",
            "parameters": {
                "type": "object",
                "properties": {
                    "place": {"type": "string"},
                    "topics": {"type": "array", "items": {"enum": ["weather", "history", "food", "travel"]}},
                    "days": {"type": "integer"},
                },
                "required": ["place", "topics", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
        },
    },
]


# A --constrain run's output: records enough that every request runs to max_tokens, so that
# constrained and free requests (the latter with --ignore-eos) produce the same lengths.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 24}, "count": {"type": "integer", "minimum": 0, "maximum": 9999}},
                "required": ["name", "count"],
            },
            "minItems": 200,
        }
    },
    "required": ["records"],
}
RECORD_TOOL = {"type": "function", "function": {"name": "record", "description": "Store records", "parameters": BENCH_SCHEMA}}


def body_extras(tool_choice: str | None = None, constrain: str | None = None, ignore_eos: bool = False) -> dict:
    """Request fields beside the prompt: tools offered with ``tool_choice``; ``constrain``:
    every reply follows BENCH_SCHEMA, as JSON (``json_schema``) or as the arguments of a
    forced call (``tool_call``); ``ignore_eos``: every reply runs to max_tokens."""
    extras: dict = {}
    if tool_choice is not None:
        extras |= {"tools": BENCH_TOOLS, "tool_choice": tool_choice}
    if constrain == "json_schema":
        extras["response_format"] = {"type": "json_schema", "json_schema": {"name": "records", "schema": BENCH_SCHEMA}}
    elif constrain == "tool_call":
        extras |= {"tools": [RECORD_TOOL], "tool_choice": {"type": "function", "function": {"name": "record"}}}
    if ignore_eos:
        extras["ignore_eos"] = True
    return extras


def _request_body(
    endpoint: str, model: str, prompt: str | list[dict], max_tokens: int, temperature: float, extras: dict | None = None,
) -> dict:
    """A streamed request; for chat, `prompt` is the user message or the whole message list."""
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body | (extras or {})


def _chunk_text(chunk: dict) -> str:
    """The text a chunk carries: content, or a tool call's name and arguments."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        delta = choice["delta"] or {}
        calls = "".join((c.get("function") or {}).get("name") or "" for c in delta.get("tool_calls") or [])
        calls += "".join((c.get("function") or {}).get("arguments") or "" for c in delta.get("tool_calls") or [])
        return (delta.get("content") or "") + calls
    return choice.get("text") or ""


def _read_usage(stats: RequestStats, usage: dict) -> None:
    stats.completion_tokens = usage.get("completion_tokens")
    stats.prompt_tokens = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details") or {}
    stats.cached_tokens = details.get("cached_tokens")


async def _sse_events(resp: aiohttp.ClientResponse):
    """Yield each `data:` payload of an SSE stream, parsed, until `[DONE]`."""
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield orjson.loads(data)


async def _consume(resp: aiohttp.ClientResponse, stats: RequestStats, start: float) -> None:
    last = None
    async for chunk in _sse_events(resp):
        if "error" in chunk:
            err = chunk["error"]
            stats.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        if chunk.get("usage"):
            _read_usage(stats, chunk["usage"])
        text = _chunk_text(chunk)
        if not text:
            continue
        stats.text += text
        now = time.perf_counter()
        if last is None:
            stats.ttft = now - start
        else:
            stats.itls.append(now - last)
        last = now
        stats.chunks += 1
    stats.ok = stats.error is None


async def _one_request(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> RequestStats:
    """Send one streaming request and time it; never raises for server or network errors."""
    stats = RequestStats()
    start = time.perf_counter()
    try:
        async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
            if resp.status != 200:
                stats.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                await _consume(resp, stats, start)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        stats.error = f"{type(exc).__name__}: {exc}"
    stats.latency = time.perf_counter() - start
    return stats


async def run_bench(
    url: str,
    *,
    concurrency: int,
    requests: int,
    prompt_tokens: int,
    shared_prefix_tokens: int,
    max_tokens: int,
    api_key: str | None = None,
    model: str | None = None,
    temperature: float = 0.0,
    endpoint: str = "completions",
    extras: dict | None = None,
    progress: bool = True,
    prefixes: int = 1,
    workload: str = "distinct",
    seed: int = 0,
) -> BenchResult:
    """Send `requests` streaming requests, at most `concurrency` at a time, and time them."""
    url = url.rstrip("/")
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    headers = _post_headers(api_key)
    if workload == "copy":
        prompts = build_copy_prompts(requests, prompt_tokens, seed=seed)
    else:
        prompts = build_prompts(requests, prompt_tokens, shared_prefix_tokens, seed=seed, prefixes=prefixes)
    async with _client(concurrency) as session:
        model = model or await fetch_model(session, url, api_key)
        bodies = [_request_body(endpoint, model, p, max_tokens, temperature, extras) for p in prompts]
        with tqdm(total=requests, file=sys.stderr, disable=not progress, unit="req") as bar:
            start = time.perf_counter()
            results = await _drive(session, url + path, bodies, headers, concurrency, bar)
            wall = time.perf_counter() - start
    return BenchResult(concurrency, max_tokens, prompt_tokens, shared_prefix_tokens, model, wall, results)


def _post_headers(api_key: str | None) -> dict[str, str]:
    return {**_headers(api_key), "Content-Type": "application/json"}


def _client(concurrency: int) -> aiohttp.ClientSession:
    # A connection per request: llama-server closes the connection after each streamed
    # response though it says keep-alive, and a request sent on it fails at once with
    # "Can not write request body" (a third of the requests at concurrency 8).
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    # No total timeout: a long generation under heavy load is a result, not an error.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def _drive(session, url: str, bodies: list[dict], headers: dict, concurrency: int, bar) -> list[RequestStats]:
    """Run the requests through `concurrency` workers, keeping results in request order."""
    results: list[RequestStats | None] = [None] * len(bodies)
    pending = iter(range(len(bodies)))

    async def worker() -> None:
        # One shared iterator: each worker takes the next index when its last one finishes.
        for i in pending:
            results[i] = await _one_request(session, url, bodies[i], headers)
            bar.update(1)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return results  # type: ignore[return-value]


# --- conversations: many clients, each resending its whole chat every turn --------------


@dataclass
class ConversationSpec:
    """How many conversations, how many user turns each, and the words in each part."""

    conversations: int
    turns: int
    system_tokens: int
    turn_tokens: int
    seed: int = 0


@dataclass
class Conversation:
    """One client's chat: its own system prompt, its user turns, and the replies so far."""

    system: str
    users: list[str]
    replies: list[str] = field(default_factory=list)

    def messages(self) -> list[dict]:
        """The next turn's request: the whole history as the server wrote it, then the next user message."""
        msgs = [{"role": "system", "content": self.system}]
        for user, reply in zip(self.users, self.replies):
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return msgs + [{"role": "user", "content": self.users[len(self.replies)]}]


def build_conversations(spec: ConversationSpec) -> list[Conversation]:
    """Distinct, seeded system prompts and user turns (each starts with its own index)."""
    systems = build_prompts(spec.conversations, spec.system_tokens, 0, seed=f"{spec.seed}:system")
    users = build_prompts(spec.conversations * spec.turns, spec.turn_tokens, 0, seed=f"{spec.seed}:user")
    return [Conversation(system, users[i * spec.turns:(i + 1) * spec.turns]) for i, system in enumerate(systems)]


async def converse(conversations: list[Conversation], send) -> list[list[RequestStats]]:
    """Take the turns in lockstep: every conversation's turn k before any conversation's k+1.

    `send` runs one turn's message lists and returns their stats in the same order; each
    reply's text joins its conversation, so the next turn resends it. Stats by turn.
    """
    turns = []
    for _ in range(len(conversations[0].users) if conversations else 0):
        stats = await send([c.messages() for c in conversations])
        for conversation, s in zip(conversations, stats):
            conversation.replies.append(s.text)
        turns.append(stats)
    return turns


@dataclass
class ConversationResult(BenchResult):
    """A conversation run: `requests` holds every turn's requests, `turns` the same by turn."""

    spec: ConversationSpec | None = None
    turns: list[list[RequestStats]] = field(default_factory=list)
    engine_prefill: int | None = None  # the server's own count over the run, where it has one

    @property
    def prompt_tokens_sent(self) -> int:
        return sum(r.prompt_tokens or 0 for r in self.requests)

    @property
    def cached_prompt_tokens(self) -> int | None:
        cached = [r.cached_tokens for r in self.requests if r.cached_tokens is not None]
        return sum(cached) if cached else None


PREFILL_METRIC = re.compile(r"^demesne_prefill_tokens_total(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


async def engine_prefill_tokens(session: aiohttp.ClientSession, url: str, api_key: str | None) -> int | None:
    """demesne's `prefill_tokens_total`, summed over engines, from /metrics at the URL's root;
    None where the server has no such counter (llama-server, vLLM) or no /metrics at all."""
    root = url.removesuffix("/v1")
    try:
        async with session.get(f"{root}/metrics", headers=_headers(api_key)) as resp:
            text = await resp.text() if resp.status == 200 else ""
        values = [float(v) for v in PREFILL_METRIC.findall(text)]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    return int(sum(values)) if values else None


async def run_conversations(
    url: str,
    spec: ConversationSpec,
    *,
    concurrency: int,
    max_tokens: int,
    api_key: str | None = None,
    model: str | None = None,
    temperature: float = 0.0,
    progress: bool = True,
) -> ConversationResult:
    """Run `spec`'s conversations on /chat/completions, turn by turn, `concurrency` requests
    at a time within a turn, and time them."""
    url = url.rstrip("/")
    headers = _post_headers(api_key)
    conversations = build_conversations(spec)
    async with _client(concurrency) as session:
        model = model or await fetch_model(session, url, api_key)
        bar = tqdm(total=spec.conversations * spec.turns, file=sys.stderr, disable=not progress, unit="req")

        async def send(histories: list[list[dict]]) -> list[RequestStats]:
            bodies = [_request_body("chat", model, h, max_tokens, temperature) for h in histories]
            return await _drive(session, url + "/chat/completions", bodies, headers, concurrency, bar)

        with bar:
            prefill_before = await engine_prefill_tokens(session, url, api_key)
            start = time.perf_counter()
            turns = await converse(conversations, send)
            wall = time.perf_counter() - start
            prefill_after = await engine_prefill_tokens(session, url, api_key)
    prefill = None if None in (prefill_before, prefill_after) else prefill_after - prefill_before
    requests = [r for turn in turns for r in turn]
    # BenchResult's prompt size: the first turn's, system prompt and one user message.
    return ConversationResult(concurrency, max_tokens, spec.system_tokens + spec.turn_tokens, 0, model, wall,
                              requests, spec=spec, turns=turns, engine_prefill=prefill)


def format_conversations(result: ConversationResult) -> str:
    """The report of a conversation run: the usual figures, the prompt tokens, TTFT by turn."""
    spec = result.spec
    lines = [
        f"model {result.model}  {spec.conversations} conversations x {spec.turns} turns  "
        f"concurrency {result.concurrency}  system ~{spec.system_tokens} words  "
        f"turn ~{spec.turn_tokens} words  max_tokens {result.max_tokens}",
        *_summary_lines(result),
        f"prompt tokens   {result.prompt_tokens_sent} sent (from usage)",
    ]
    if result.cached_prompt_tokens is not None:
        lines.append(f"cached tokens   {result.cached_prompt_tokens} (from usage)")
    if result.engine_prefill is not None:
        lines.append(f"prefill tokens  {result.engine_prefill} (engine)")
    by_turn = "  ".join(f"{k}: {_ms(_ttft(turn, 50))}" for k, turn in enumerate(result.turns, 1))
    lines.append(f"TTFT p50/turn   {by_turn}")
    lines += _error_lines(result.failed)
    return "\n".join(lines)


@click.command("bench")
@click.option("--url", default="http://127.0.0.1:9090/v1", show_default=True, help="Base URL of the OpenAI API.")
@click.option("--api-key", envvar="DEMESNE_API_KEY", default=None, help="Bearer token (env DEMESNE_API_KEY).")
@click.option("--model", default=None, help="Model id; default: the first one /models lists.")
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--requests", "n_requests", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--shared-prefix-tokens", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--prefixes", default=1, show_default=True, type=click.IntRange(min=1),
              help="How many different shared prefixes (system prompts), taken in turn by the requests.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--workload", type=click.Choice(["distinct", "copy"]), default="distinct", show_default=True,
              help="distinct: prompts of random words (--shared-prefix-tokens of them shared); copy: each prompt"
                   " asks for its --prompt-tokens words of code back with one name changed (copy-heavy output,"
                   " where speculative decoding pays).")
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True)
@click.option("--tool-choice", type=click.Choice(["auto", "required"]), default=None,
              help="Chat only: offer two tools with this tool_choice (required: every reply is a grammar-forced call).")
@click.option("--constrain", type=click.Choice(["json_schema", "tool_call"]), default=None,
              help="Every reply follows a long JSON schema: as response_format, or as a forced call's arguments (chat only).")
@click.option("--ignore-eos", is_flag=True, help="Every reply runs to --max-tokens (to compare with --constrain).")
@click.option("--conversations", default=None, type=click.IntRange(min=1),
              help="Chat only: run this many multi-turn conversations instead of --requests single prompts.")
@click.option("--turns", default=4, show_default=True, type=click.IntRange(min=1),
              help="User turns per conversation, taken in lockstep; each resends the whole history.")
@click.option("--system-tokens", default=600, show_default=True, type=click.IntRange(min=1),
              help="Words in each conversation's own system prompt.")
@click.option("--turn-tokens", default=45, show_default=True, type=click.IntRange(min=1),
              help="Words in each user turn.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the generated prompts: another seed, other prompts (repeated runs against a warm"
                   " server that keeps its prefix cache measure prefill again instead of cache hits).")
@click.option("--no-progress", is_flag=True, help="Do not draw a progress bar.")
def bench(url, api_key, model, concurrency, n_requests, prompt_tokens, shared_prefix_tokens, prefixes, max_tokens,
          workload, temperature, endpoint, tool_choice, constrain, ignore_eos, conversations, turns, system_tokens, turn_tokens,
          seed, no_progress):
    """Measure throughput and latency of an OpenAI-compatible server with streamed requests."""
    if (tool_choice or constrain == "tool_call") and endpoint != "chat":
        raise click.UsageError("--tool-choice and --constrain tool_call need --endpoint chat")
    if tool_choice and constrain:
        raise click.UsageError("--tool-choice and --constrain cannot be combined")
    if workload == "copy" and (conversations or shared_prefix_tokens):
        raise click.UsageError("--workload copy takes neither --conversations nor --shared-prefix-tokens")
    if conversations and (endpoint != "chat" or tool_choice):
        raise click.UsageError("--conversations needs --endpoint chat and no --tool-choice")
    common = {"concurrency": concurrency, "max_tokens": max_tokens, "api_key": api_key, "model": model,
              "temperature": temperature, "progress": not no_progress}
    try:
        if conversations:
            spec = ConversationSpec(conversations, turns, system_tokens, turn_tokens, seed)
            result = asyncio.run(run_conversations(url, spec, **common))
        else:
            result = asyncio.run(run_bench(
                url, requests=n_requests, prompt_tokens=prompt_tokens, shared_prefix_tokens=shared_prefix_tokens,
                prefixes=prefixes, workload=workload, seed=seed, endpoint=endpoint, extras=body_extras(tool_choice, constrain, ignore_eos), **common,
            ))
    except (aiohttp.ClientError, KeyError, IndexError) as exc:
        # Only the model lookup can get here; the requests themselves record their errors.
        raise click.ClickException(f"cannot list models at {url}/models: {exc}") from exc
    click.echo(format_conversations(result) if conversations else format_result(result))
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":
    bench()
