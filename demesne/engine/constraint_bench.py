"""A micro benchmark of constrained decoding alone: milliseconds of mask time per step.

    python -m demesne.engine.constraint_bench [--rows 16] [--steps 200]

On the bundled model's vocabulary (or ``--model``), ``rows`` sequences each follow a grammar
the way the engine drives them: every step computes all their masks at once (in parallel, as
the engine does beside llama_decode), then feeds each row its next token of a valid output.
Printed per grammar: the time of one step's masks for all rows (mean, p50, p99), and of one
row alone, and what compiling it cost. The grammars are those of ``demesne bench --constrain``:
the JSON schema as ``response_format``, and as the arguments of a forced call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import llguidance
import numpy as np

from ..bench import BENCH_SCHEMA, RECORD_TOOL
from ..config import EngineConfig
from ..gateway.structured import output_grammar
from ..gateway.tool_formats import GENERIC
from ..gateway.tools import call_constraint, parse_tools, write_calls
from ..model import resolve_model
from .constraints import Constraints
from .runner import ModelRunner


def _records(n: int) -> dict:
    return {"records": [{"name": f"item number {i}", "count": i * 7 % 9999} for i in range(n)]}


def _cases() -> list[tuple[str, str, bool, str]]:
    """(name, grammar, lazy, a valid output) for each grammar measured."""
    schema, _ = output_grammar({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": BENCH_SCHEMA}}})
    text = json.dumps(_records(200), indent=1)
    tool, lazy = call_constraint(parse_tools({"tools": [RECORD_TOOL], "tool_choice": "required"}), GENERIC)
    call = write_calls(GENERIC, [("record", _records(200))])
    auto, auto_lazy = call_constraint(parse_tools({"tools": [RECORD_TOOL]}), GENERIC)
    return [("json_schema", schema, False, text), ("forced tool call", tool, lazy, call), ("auto, text then a call", auto, auto_lazy, "Sure. " * 20 + call)]


def _step_times(cons: Constraints, matchers: list, tokens: list[int], steps: int) -> list[float]:
    times = []
    for step in range(min(steps, len(tokens))):
        rows = [(row, c) for row, c in enumerate(matchers)]
        t0 = time.perf_counter()
        cons.start_masks(rows)
        cons.wait()
        times.append(time.perf_counter() - t0)
        for c in matchers:
            assert c.matcher.consume_token(tokens[step]), c.error()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    runner = ModelRunner(EngineConfig(model=resolve_model(args.model), ctx_size=512, max_seqs=1, threads=1))
    t0 = time.perf_counter()
    tokenizer = runner.llg_tokenizer()
    print(f"llguidance tokenizer for {runner.n_vocab} tokens: {time.perf_counter() - t0:.2f} s")
    cons = Constraints(lambda: tokenizer, runner.n_vocab, args.rows, int(np.flatnonzero(runner.eog)[0]))
    for name, grammar, lazy, text in _cases():
        t0 = time.perf_counter()
        first = cons.compile(grammar, lazy)
        first = first.result() if not hasattr(first, "matcher") else first
        compile_ms = (time.perf_counter() - t0) * 1000
        tokens = tokenizer.tokenize_str(text)
        # As the engine starts them: forced grammars hot (masked every step), lazy ones cold
        # (a lazy row turns hot when its grammar first refuses a sampled token; this valid
        # output never makes it refuse).
        batch = _step_times(cons, [cons.compile(grammar, lazy) for _ in range(args.rows)], tokens, args.steps)
        single = _step_times(cons, [cons.compile(grammar, lazy)], tokens, args.steps)
        ms = sorted(t * 1000 for t in batch)
        print(
            f"{name:24s} compile {compile_ms:6.1f} ms | {args.rows} rows a step: mean {statistics.mean(ms):.2f} ms"
            f" p50 {ms[len(ms) // 2]:.2f} p99 {ms[int(len(ms) * 0.99)]:.2f} | one row: mean"
            f" {statistics.mean(single) * 1000:.3f} ms ({len(batch)} steps)"
        )
    cons.close()
    runner.close()
    print(f"(llguidance {llguidance.__version__}; llama.cpp's grammar sampler took ~28 ms for one row's full-vocabulary check here)")


if __name__ == "__main__":
    main()
