"""Reasoning split from replies (gateway/reasoning.py): at every chunk boundary, for the
layouts Qwen 3 and DeepSeek R1 write, and templates that open the block in the prompt."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from demesne.gateway.chat_template import ChatTemplate
from demesne.gateway.reasoning import ThinkSplitter, opens_thinking, splitter
from demesne.gateway.tool_formats import HERMES
from demesne.gateway.tools import ToolStream, parse_calls, parse_tools

CASES = [
    # (reply, starts inside, reasoning, content)
    ("<think>\nLet me add: 2 + 2 = 4.\n</think>\n\nThe answer is 4.", False, "\nLet me add: 2 + 2 = 4.\n", "The answer is 4."),
    ("  <think>a</think>b", False, "a", "b"),
    ("<think></think>\n\nJust the answer.", False, "", "Just the answer."),
    ("No thinking here <think>x</think>", False, "", "No thinking here <think>x</think>"),
    ("Okay, so 3 * 3 is 9.\n</think>\n\n9", True, "Okay, so 3 * 3 is 9.\n", "9"),
    ("<think>cut off while thinking, no close", False, "cut off while thinking, no close", ""),
    ("<think>one</think>two</think>three", False, "one", "two</think>three"),
    ("<thinking>is not the tag</thinking>", False, "", "<thinking>is not the tag</thinking>"),
    ("<think>a < b and c </thin k> d</think>e", False, "a < b and c </thin k> d", "e"),
    ("", False, "", ""),
    ("   ", False, "", "   "),
    ('<think>call a tool</think>\n<tool_call>{"name": "f"}</tool_call>', False, "call a tool", '<tool_call>{"name": "f"}</tool_call>'),
]


def run(chunks: list[str], inside: bool) -> tuple[str, str]:
    s = ThinkSplitter(inside)
    reasoning, content = [], []
    for chunk in chunks:
        r, c = s.feed(chunk)
        reasoning.append(r)
        content.append(c)
    r, c = s.finish()
    return "".join(reasoning) + r, "".join(content) + c


@pytest.mark.parametrize("reply,inside,reasoning,content", CASES)
def test_every_chunking_gives_the_same_split(reply, inside, reasoning, content):
    assert run([reply], inside) == (reasoning, content)
    assert run(list(reply), inside) == (reasoning, content)  # a character at a time
    for cut in range(len(reply) + 1):  # every single boundary
        assert run([reply[:cut], reply[cut:]], inside) == (reasoning, content), cut
    rng = random.Random(len(reply))
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(reply) + 1), min(len(reply), 4)))
        chunks = [reply[a:b] for a, b in zip([0] + cuts, cuts + [len(reply)])]
        assert run(chunks, inside) == (reasoning, content), chunks


TEMPLATES = Path(__file__).parent / "templates"
QWEN3 = (TEMPLATES / "qwen3.jinja").read_text()  # Qwen 3's layout, with its enable_thinking switch
R1 = (TEMPLATES / "deepseek_r1.jinja").read_text()  # DeepSeek R1's: the generation prompt opens <think>


def test_templates_in_qwen3_and_r1_layouts_are_detected():
    ask = [{"role": "user", "content": "2 + 2?"}]
    qwen = ChatTemplate(QWEN3, "", "<|im_end|>", "test")
    prompt = qwen.render(ask)
    s = splitter("auto", QWEN3, opens_thinking(prompt))
    assert s is not None and s.state == "start"  # Qwen 3 opens the block itself
    off = qwen.render(ask, extra={"enable_thinking": False})
    assert off.rstrip().endswith("</think>")
    assert splitter("auto", QWEN3, opens_thinking(off)).state == "start"  # thinking off: the reply is the answer
    r1 = ChatTemplate(R1, "<bos>", "<eos>", "test")
    prompt = r1.render(ask)
    assert splitter("auto", R1, opens_thinking(prompt)).state == "inside"  # R1's prompt opens the block
    assert splitter("none", R1, True) is None
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert splitter("auto", plain, False) is None and splitter("deepseek", plain, False) is not None


def test_a_tool_call_after_reasoning_is_parsed_whole_and_streamed():
    """The answer after the reasoning goes to the call parser; markup inside the reasoning
    does not (a model may think about the call it is going to make)."""
    spec = parse_tools({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]})
    reply = '<think>I could write <tool_call>{"name": "g"}</tool_call> but f fits.</think>\n\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    r, c = run([reply], False)
    assert "g" in r and "f fits" in r
    content, calls = parse_calls(c, spec, HERMES)
    assert not content and [(k["function"]["name"], json.loads(k["function"]["arguments"])) for k in calls] == [("f", {"x": 1})]
    for cut in range(len(reply) + 1):
        split, tools = ThinkSplitter(), ToolStream(spec, HERMES)
        deltas = []
        for chunk in (reply[:cut], reply[cut:]):
            _, answer = split.feed(chunk)
            deltas += tools.feed(answer)[1]
        deltas += tools.feed(split.finish()[1])[1] + tools.finish()[1]
        assert [d["function"]["name"] for d in deltas if "id" in d] == ["f"], cut
        assert json.loads("".join(d["function"].get("arguments", "") for d in deltas)) == {"x": 1}, cut


def fake_engine(replies: dict[int, list[str]], calls: list, closed: list):
    """make(tokens, n) of budgeted(): a reply of one piece per token, chosen by prompt length."""
    from demesne.gateway.generation import Piece

    def make(tokens: list[int], n: int):
        calls.append((list(tokens), n))

        async def gen():
            try:
                texts = replies[len(tokens)][:n]
                for i, text in enumerate(texts):
                    last = i == len(texts) - 1
                    yield Piece(text, "length" if last else None, len(tokens), i + 1, 2)
            finally:
                closed.append(len(tokens))

        return gen()

    return make


async def collect(gen) -> list:
    return [piece async for piece in gen]


@pytest.mark.parametrize("inside", [True, False])
async def test_a_reasoning_budget_closes_the_block_and_the_answer_follows(inside):
    from demesne.gateway.reasoning import CLOSING, budgeted

    opening = [] if inside else ["<think>"]
    thoughts = opening + ["a", "b", "c", "d", "e", "f"]
    cut_at = len(opening) + 3  # tokens of the first request when the budget (3 + the tag) runs out
    encode = lambda text: [ord(ch) for ch in text]  # noqa: E731
    prompt = [1, 2, 3]
    continuation = prompt + encode("".join(thoughts[:cut_at]) + CLOSING)
    calls, closed = [], []
    make = fake_engine({len(prompt): thoughts, len(continuation): ["Answer", " four", "."]}, calls, closed)
    pieces = await collect(budgeted(make, prompt, 10, cut_at, encode, inside))
    text = "".join(p.text for p in pieces)
    assert text == "".join(thoughts[:cut_at]) + CLOSING + "Answer four."
    assert calls == [(prompt, 10), (continuation, 10 - cut_at)] and closed[0] == len(prompt)
    assert pieces[-1].finish == "length" and pieces[-1].prompt_tokens == 3 and pieces[-1].completion_tokens == cut_at + 3
    r, c = run([p.text for p in pieces], inside)
    assert r == "".join(thoughts[len(opening):cut_at]) + "\n" and c == "Answer four."


async def test_a_block_closed_within_budget_is_one_request():
    from demesne.gateway.reasoning import budgeted

    calls, closed = [], []
    make = fake_engine({3: ["<think>", "x", "</think>", "ok"]}, calls, closed)
    pieces = await collect(budgeted(make, [1, 2, 3], 10, 5, lambda t: [0], False))
    assert "".join(p.text for p in pieces) == "<think>x</think>ok" and len(calls) == 1


async def test_a_zero_budget_closes_an_opened_block_at_once():
    from demesne.gateway.reasoning import CLOSING, budgeted

    encode = lambda text: [ord(ch) for ch in text]  # noqa: E731
    calls, closed = [], []
    make = fake_engine({3 + len(CLOSING): ["Four."]}, calls, closed)
    pieces = await collect(budgeted(make, [1, 2, 3], 10, 0, encode, True))
    assert [p.text for p in pieces] == ["Four."] and calls == [([1, 2, 3] + encode(CLOSING), 10)]
