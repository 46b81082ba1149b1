"""The load generator (`demesne.bench`) and the suite's table, against a tiny fake SSE server.

The fake server stands in for any OpenAI-compatible endpoint: what is under test here is the
client that measures, not demesne. One e2e test runs the conversation workload on demesne itself.
"""

import asyncio

import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from click.testing import CliRunner
from conftest import API_KEY as SERVER_KEY

from demesne.bench import (
    BenchResult,
    ConversationSpec,
    RequestStats,
    bench,
    build_conversations,
    build_prompts,
    converse,
    format_conversations,
    format_result,
    percentile,
    body_extras,
    run_bench,
    run_conversations,
)
from demesne.bench_suite import _parse_levels, summary_table

API_KEY = "sk-test"


# --- prompts ---------------------------------------------------------------------------


def test_prompts_share_exactly_the_prefix():
    prompts = build_prompts(8, prompt_tokens=100, shared_prefix_tokens=60)
    words = [p.split() for p in prompts]
    assert all(w[:60] == words[0][:60] for w in words)
    suffixes = {" ".join(w[60:]) for w in words}
    assert len(suffixes) == 8


def test_prompts_without_prefix_are_distinct_and_deterministic():
    prompts = build_prompts(50, prompt_tokens=16, shared_prefix_tokens=0)
    assert len(set(prompts)) == 50
    assert prompts == build_prompts(50, prompt_tokens=16, shared_prefix_tokens=0)


@pytest.mark.parametrize("n_tokens,shared", [(128, 0), (128, 100), (512, 256), (8, 8)])
def test_prompt_length_is_about_the_request(n_tokens, shared):
    for p in build_prompts(4, prompt_tokens=n_tokens, shared_prefix_tokens=shared):
        assert abs(len(p.split()) - n_tokens) <= 1


def test_prefix_longer_than_prompt_is_clamped():
    prompts = build_prompts(3, prompt_tokens=10, shared_prefix_tokens=50)
    assert len(set(prompts)) == 3


# --- conversations ---------------------------------------------------------------------


def test_conversations_are_distinct_sized_and_deterministic():
    spec = ConversationSpec(conversations=6, turns=3, system_tokens=600, turn_tokens=45)
    convs = build_conversations(spec)
    assert [(c.system, c.users) for c in convs] == [(c.system, c.users) for c in build_conversations(spec)]
    assert len({c.system for c in convs}) == 6 and len({u for c in convs for u in c.users}) == 18
    assert all(abs(len(c.system.split()) - 600) <= 1 for c in convs)
    assert all(len(c.users) == 3 and all(abs(len(u.split()) - 45) <= 1 for u in c.users) for c in convs)
    other = build_conversations(ConversationSpec(6, 3, 600, 45, seed=1))
    assert {c.system for c in other}.isdisjoint(c.system for c in convs)


async def test_converse_takes_turns_in_lockstep_and_resends_the_replies():
    convs = build_conversations(ConversationSpec(conversations=3, turns=3, system_tokens=20, turn_tokens=5))
    sent: list[list[list[dict]]] = []

    async def send(histories):  # one call per turn, with every conversation in it
        sent.append(histories)
        return [RequestStats(ok=True, text=f"reply {i}.{len(sent)}") for i in range(len(histories))]

    turns = await converse(convs, send)
    assert len(turns) == 3 and [len(t) for t in turns] == [3, 3, 3]
    assert [[len(h) for h in histories] for histories in sent] == [[2, 2, 2], [4, 4, 4], [6, 6, 6]]
    for i, conv in enumerate(convs):
        last = sent[2][i]
        assert last[0] == {"role": "system", "content": conv.system}
        assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert [m["content"] for m in last[1::2]] == conv.users
        assert [m["content"] for m in last[2::2]] == [f"reply {i}.1", f"reply {i}.2"]
        assert conv.replies == [f"reply {i}.1", f"reply {i}.2", f"reply {i}.3"]


def test_conversations_need_the_chat_endpoint():
    out = CliRunner().invoke(bench, ["--conversations", "2"])
    assert out.exit_code == 2 and "--endpoint chat" in out.output


# --- figures ---------------------------------------------------------------------------


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([5.0], 90) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert percentile(list(range(11)), 90) == pytest.approx(9.0)


def _result(concurrency: int, tokens: int, wall: float, failed: int = 0) -> BenchResult:
    ok = RequestStats(ok=True, ttft=0.1, itls=[0.01, 0.03], chunks=3, completion_tokens=tokens,
                      prompt_tokens=128, cached_tokens=64)
    bad = [RequestStats(error="HTTP 503: busy") for _ in range(failed)]
    return BenchResult(concurrency, 128, 128, 0, "m", wall, [ok, *bad])


def test_format_result_reports_the_figures():
    text = format_result(_result(4, tokens=100, wall=2.0, failed=2))
    assert "1 ok, 2 failed" in text
    assert "50.0 tok/s" in text
    assert "p50 100.0 ms" in text  # TTFT
    assert "p50 20.0 ms" in text  # inter-token
    assert "128.0 mean" in text and "64.0 mean per request" in text
    assert "2x HTTP 503: busy" in text


def test_output_tokens_fall_back_to_chunks_without_usage():
    assert RequestStats(ok=True, chunks=7).output_tokens == 7


def test_summary_table_speedup_is_against_concurrency_one():
    table = summary_table([_result(1, 100, 1.0), _result(8, 400, 1.0)])
    assert "4.00x" in table.splitlines()[2]


def test_parse_levels():
    assert _parse_levels(None, None, "1, 8,16") == [1, 8, 16]
    with pytest.raises(Exception):
        _parse_levels(None, None, "0,2")


# --- against a fake server -------------------------------------------------------------


class FakeOpenAI:
    """Streams `max_tokens` one-word chunks and a usage chunk; counts requests in flight."""

    def __init__(self):
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies = []
        self.prefill = 0  # what /metrics reports, split over two engines
        self.metrics_text = None  # or what /metrics says instead ("501": that status)

    async def metrics(self, request):
        if self.metrics_text == "501":
            return web.json_response({"error": {"message": "metrics not enabled"}}, status=501)
        if self.metrics_text is not None:
            return web.Response(text=self.metrics_text)
        half = self.prefill // 2
        lines = ["# TYPE demesne_prefill_tokens_total counter",
                 f'demesne_prefill_tokens_total{{engine="a"}} {half}',
                 f'demesne_prefill_tokens_total{{engine="b"}} {self.prefill - half}',
                 'demesne_prefill_tokens_total_other{engine="a"} 1000']
        return web.Response(text="\n".join(lines) + "\n")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        return app

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def complete(self, request):
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": {"message": "bad key", "type": "auth"}}, status=401)
        body = await request.json()
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._stream(request, body)
        finally:
            self.in_flight -= 1

    async def _stream(self, request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chat = "messages" in body
        prompt = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        self.prefill += len(prompt.split())
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.002)
            if body.get("tools"):  # a streamed call: the head, then arguments in pieces
                call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "add", "arguments": ""}}
                delta = {"tool_calls": [call if i == 0 else {"index": 0, "function": {"arguments": "{}"[i % 2]}}]}
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "delta": {"content": "tok "}} if chat else {"index": 0, "text": "tok "}
            await resp.write(b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n")
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": 5}}
        await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest_asyncio.fixture
async def fake():
    server = FakeOpenAI()
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield server, f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_run_bench_measures_a_streaming_server(fake, endpoint):
    server, url = fake
    result = await run_bench(url, concurrency=3, requests=10, prompt_tokens=32, shared_prefix_tokens=16,
                             max_tokens=5, api_key=API_KEY, endpoint=endpoint, progress=False)
    assert len(result.ok) == 10 and not result.failed
    assert result.model == "fake-model"
    assert result.output_tokens == 50
    assert server.max_in_flight <= 3
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in server.bodies)
    assert all(b["max_tokens"] == 5 and b["temperature"] == 0.0 for b in server.bodies)
    assert all(r.ttft is not None and len(r.itls) == 4 for r in result.ok)
    assert all(r.prompt_tokens == 32 and r.cached_tokens == 5 for r in result.ok)
    assert "10 ok, 0 failed" in format_result(result)


@pytest.mark.parametrize("workload", ["distinct", "copy"])
async def test_run_bench_seed_picks_the_prompts(fake, workload):
    """Another --seed, other prompts (a warm server's prefix cache cannot answer a repeated
    run); the same seed, the same prompts."""
    server, url = fake
    runs = {}
    for seed in (0, 0, 7):
        server.bodies.clear()
        await run_bench(url, concurrency=2, requests=3, prompt_tokens=24, shared_prefix_tokens=0, max_tokens=2,
                        api_key=API_KEY, progress=False, workload=workload, seed=seed)
        runs.setdefault(seed, []).append(sorted(b["prompt"] for b in server.bodies))
    assert runs[0][0] == runs[0][1]
    assert not set(runs[0][0]) & set(runs[7][0])


async def test_run_bench_with_tools_times_streamed_calls(fake):
    server, url = fake
    result = await run_bench(url, concurrency=2, requests=4, prompt_tokens=16, shared_prefix_tokens=0, max_tokens=5,
                             api_key=API_KEY, endpoint="chat", extras=body_extras("required"), progress=False)
    assert len(result.ok) == 4 and result.output_tokens == 20
    assert all(b["tool_choice"] == "required" and {t["function"]["name"] for t in b["tools"]} == {"lookup", "add"} for b in server.bodies)
    assert all(r.ttft is not None and len(r.itls) == 4 for r in result.ok)  # call deltas count as output


def test_tool_choice_needs_the_chat_endpoint():
    out = CliRunner().invoke(bench, ["--tool-choice", "required"])
    assert out.exit_code == 2 and "--endpoint chat" in out.output
    out = CliRunner().invoke(bench, ["--constrain", "tool_call"])
    assert out.exit_code == 2 and "--endpoint chat" in out.output


def test_constrained_runs_ask_for_long_outputs():
    """--constrain makes every reply follow a schema long enough to run to max_tokens;
    --ignore-eos makes free replies run that long too, so the two compare."""
    schema = body_extras(constrain="json_schema")["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["records"]["minItems"] >= 100
    call = body_extras(constrain="tool_call", ignore_eos=True)
    assert call["tool_choice"]["function"]["name"] == call["tools"][0]["function"]["name"] and call["ignore_eos"] is True


async def test_run_bench_records_errors_without_raising(fake):
    _, url = fake
    result = await run_bench(url, concurrency=2, requests=4, prompt_tokens=8, shared_prefix_tokens=0,
                             max_tokens=3, api_key="wrong", model="fake-model", progress=False)
    assert len(result.failed) == 4
    assert all(r.error.startswith("HTTP 401") for r in result.failed)


async def test_run_bench_records_connection_errors():
    result = await run_bench("http://127.0.0.1:9/v1", concurrency=1, requests=2, prompt_tokens=8,
                             shared_prefix_tokens=0, max_tokens=3, model="m", progress=False)
    assert len(result.failed) == 2 and all(r.error for r in result.failed)


async def test_run_conversations_resends_each_history(fake):
    server, url = fake
    spec = ConversationSpec(conversations=4, turns=3, system_tokens=30, turn_tokens=6)
    result = await run_conversations(url, spec, concurrency=2, max_tokens=3, api_key=API_KEY, progress=False)
    assert len(result.ok) == 12 and [len(t) for t in result.turns] == [4, 4, 4]
    assert server.max_in_flight <= 2
    assert [len(b["messages"]) for b in server.bodies] == [2] * 4 + [4] * 4 + [6] * 4  # lockstep
    assert all(b["stream_options"] == {"include_usage": True} for b in server.bodies)
    replies = {m["content"] for b in server.bodies[4:] for m in b["messages"] if m["role"] == "assistant"}
    assert replies == {"tok tok tok "}
    assert result.prompt_tokens_sent == sum(r.prompt_tokens for r in result.requests) == server.prefill
    assert result.cached_prompt_tokens == 5 * 12 and result.engine_prefill == server.prefill
    text = format_conversations(result)
    assert "12 ok, 0 failed" in text and f"{server.prefill} sent" in text and "60 (from usage)" in text
    assert f"prefill tokens  {server.prefill} (engine)" in text
    assert "TTFT p50/turn   1: " in text and "  3: " in text


@pytest.mark.parametrize("metrics", [
    "501",  # llama-server without --metrics
    "llamacpp:prompt_tokens_total 1234\nllamacpp:tokens_predicted_total 99\n",  # with it
])
async def test_run_conversations_without_engine_metrics(fake, metrics):
    server, url = fake
    server.metrics_text = metrics
    spec = ConversationSpec(conversations=2, turns=2, system_tokens=4, turn_tokens=2)
    result = await run_conversations(url, spec, concurrency=1, max_tokens=2, api_key=API_KEY, progress=False)
    assert len(result.ok) == 4 and result.engine_prefill is None
    assert "prefill tokens" not in format_conversations(result)


def test_bench_command_help():
    out = CliRunner().invoke(bench, ["--help"])
    assert out.exit_code == 0
    for flag in ("--url", "--api-key", "--concurrency", "--shared-prefix-tokens", "--no-progress"):
        assert flag in out.output


# --- against demesne -------------------------------------------------------------------


@pytest.mark.e2e
async def test_conversations_against_demesne(server):
    spec = ConversationSpec(conversations=2, turns=2, system_tokens=100, turn_tokens=20)
    result = await run_conversations(server.v1, spec, concurrency=2, max_tokens=4, api_key=SERVER_KEY,
                                     progress=False)
    assert len(result.ok) == 4, format_conversations(result)
    for first, second in zip(*result.turns):
        assert first.text and 1 <= first.completion_tokens <= 4
        # The second prompt holds the first one, the reply and another user turn of 20+ tokens.
        assert second.prompt_tokens >= first.prompt_tokens + first.completion_tokens + spec.turn_tokens
    assert result.engine_prefill is not None and 0 < result.engine_prefill <= result.prompt_tokens_sent
    assert "prefill tokens" in format_conversations(result)


def test_kv_layout_bench_runs_every_layout(capsys):
    from demesne.engine import kv_layout_bench

    kv_layout_bench.main(["--rows", "2", "--context", "40", "--chunk", "8", "--steps", "1"])
    out = capsys.readouterr().out
    for name, _, _ in kv_layout_bench.LAYOUTS:
        assert name in out
    assert out.count(" ms") == 2 * len(kv_layout_bench.LAYOUTS)
