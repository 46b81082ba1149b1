"""demesne.gateway.generation and logprobs on the real vocabulary, with a fake engine stream:
the stripped reply's logprobs spell its content, deadlines end a choice as "length", and the
observability figures a choice leaves behind."""

from __future__ import annotations

import asyncio

import pytest

from demesne import protocol as p
from demesne.gateway.generation import ModelContext, generate_text
from demesne.gateway.logprobs import LogprobShaper
from demesne.gateway.observability import Histogram, Observability, RequestStats


class FakeClient:
    """Yields the given deltas (then waits forever, if ``hang``); records whether it was closed."""

    def __init__(self, deltas: list[p.Delta], hang: bool = False):
        self.deltas = deltas
        self.hang = hang
        self.closed = False

    async def generate(self, engine, request):
        try:
            for delta in self.deltas:
                await asyncio.sleep(0)
                yield delta
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed = True


def model(tokenizer) -> ModelContext:
    return ModelContext(None, tokenizer, None, None)


def deltas_for(tokenizer, pieces: list[str], finish: str = "stop") -> list[p.Delta]:
    ids = [tokenizer.encode(text, add_special=False)[0] for text in pieces]
    assert [tokenizer.piece(i).decode() for i in ids] == pieces
    out = [p.Delta("r", [i], logprobs=[[-0.5, [[i, -0.5]]]]) for i in ids]
    out[-1].finish = finish
    return out


async def run(tokenizer, client: FakeClient, strip: bool, stops=(), deadline=None, stats=None):
    shaper = LogprobShaper(tokenizer, chat=True)
    request = p.Generate("r", [2, 3], 100, p.SamplingParams(logprobs=1))
    text, finish, streamed = "", None, []
    async for piece in generate_text(client, None, model(tokenizer), request, list(stops), strip, deadline, stats):
        text += piece.text
        part = shaper.add(piece)
        streamed += part["content"] if part else []
        finish = piece.finish
    return text, finish, shaper.total["content"], streamed


@pytest.mark.parametrize(
    "pieces",
    [
        [" Hello", " world"],  # the space the model writes after "Assistant:"
        ["\n", " Hello", "\n"],  # a whole token of whitespace first, and one that may start "\nUser:"
        ["\n", "\n", "Hi"],
        [" ", "\n"],  # nothing but whitespace
    ],
)
async def test_stripped_reply_logprobs_spell_the_content(tokenizer, pieces):
    text, _, total, streamed = await run(tokenizer, FakeClient(deltas_for(tokenizer, pieces)), True, ["\nUser:"])
    assert text == "".join(pieces).lstrip()
    assert "".join(e["token"] for e in total) == text
    assert b"".join(bytes(e["bytes"]) for e in total) == text.encode()
    assert len(total) == len(pieces) and streamed == total  # one entry per token, streamed alike


async def test_unstripped_logprobs_are_untouched(tokenizer):
    text, _, total, _ = await run(tokenizer, FakeClient(deltas_for(tokenizer, [" Hello", " world"])), False)
    assert text == " Hello world" == "".join(e["token"] for e in total)


async def test_deadline_ends_the_choice_as_length_and_closes_the_engine_stream(tokenizer):
    client = FakeClient(deltas_for(tokenizer, [" Hello", " world"])[:2], hang=True)
    client.deltas[-1].finish = None
    deadline = asyncio.get_running_loop().time() + 0.3
    text, finish, total, _ = await asyncio.wait_for(run(tokenizer, client, False, deadline=deadline), 5)
    assert (text, finish) == (" Hello world", "length")
    assert client.closed and "".join(e["token"] for e in total) == text


async def test_a_choice_reports_its_tokens_and_gaps(tokenizer):
    obs = Observability()
    stats = RequestStats(obs)
    await run(tokenizer, FakeClient(deltas_for(tokenizer, [" Hello", " world", "!"])), False, stats=stats)
    assert stats.rids == ["r"] and stats.completion_tokens == 3
    assert stats.sent is not None and stats.first_token >= stats.sent
    assert sum(obs.itl.counts) == 2  # the gaps between three tokens


def test_histogram_prometheus_text():
    h = Histogram("demesne_x_seconds", "X", (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    h.observe(0.5, count=2)
    assert h.lines() == [
        "# HELP demesne_x_seconds X",
        "# TYPE demesne_x_seconds histogram",
        'demesne_x_seconds_bucket{le="0.1"} 2',
        'demesne_x_seconds_bucket{le="1"} 5',
        'demesne_x_seconds_bucket{le="+Inf"} 6',
        "demesne_x_seconds_sum 4.650000",
        "demesne_x_seconds_count 6",
    ]
