"""A micro benchmark of the sampler alone: milliseconds to sample one decode step's rows.

    python -m demesne.engine.sampler_bench [--real] [--rows 32] [--baseline OLD_SAMPLER.py]

``--real`` takes the logits of the bundled model (the next token after ``rows`` prompts, a
few greedy steps in); without it, a synthetic block shaped like them. ``--baseline`` times
another version of ``sampler.py`` side by side (e.g. ``git show HEAD~1:demesne/engine/sampler.py``
saved to a file). Also printed: how much probability mass a 1e-4-of-the-best cut drops.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import numpy as np

from ..protocol import SamplingParams
from . import sampler as current

CASES = [
    ("T=1", SamplingParams(temperature=1.0)),
    ("T=2", SamplingParams(temperature=2.0)),
    ("T=1 top_p=.95", SamplingParams(temperature=1.0, top_p=0.95)),
    ("T=2 top_p=.95", SamplingParams(temperature=2.0, top_p=0.95)),
    ("T=1 top_k=40", SamplingParams(temperature=1.0, top_k=40)),
    ("T=2 top_k=40", SamplingParams(temperature=2.0, top_k=40)),
    ("T=0.8 top_k=40 top_p=.95 min_p=.05", SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)),
    ("T=1 min_p=.05", SamplingParams(temperature=1.0, min_p=0.05)),
]

PROMPTS = [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,",
    "In 1492, Columbus", "Water boils at", "My favourite animal is", "To be or not to be",
    "The best way to learn a language", "import numpy as np\n", "Dear Sir or Madam,", "Recipe: pancakes.",
    "The mitochondria is", "SELECT * FROM", "Yesterday I went to", "The stock market",
    "Q: What is 17 * 23?\nA:", "<html><head>", "Il était une fois", "The theory of relativity",
    "Breaking news:", "for i in range(", "The quick brown fox", "Once the rain stopped, we",
    "Chapter 1\n\n", "My name is", "In conclusion,", "The weather today is",
    "Abstract: We propose", "Hello, world", "The three laws of robotics", "When I was young",
]


def real_logits(rows: int, steps: int = 3) -> np.ndarray:
    """The bundled model's logits for ``rows`` sequences, ``steps`` greedy tokens after their prompts."""
    from ..config import EngineConfig
    from ..gateway.tokenizer import Tokenizer
    from ..model import resolve_model
    from .runner import ModelRunner

    path = resolve_model(None)
    runner = ModelRunner(EngineConfig(model=path, threads=2, ctx_size=4096, max_seqs=max(rows, 8)))
    tokenizer = Tokenizer(path)
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(rows)]
    batch = runner.batch
    batch.clear()
    for seq, tokens in enumerate(prompts):
        batch.add_span(tokens, 0, seq, True)
    logits = runner.decode()
    for step in range(steps):
        chosen = logits.argmax(axis=1)
        batch.clear()
        for seq, tokens in enumerate(prompts):
            batch.add_span([int(chosen[seq])], len(tokens) + step, seq, True)
        logits = runner.decode()
    out = np.array(logits, np.float32)
    runner.close()
    return out


def synthetic_logits(rows: int, seed: int = 0) -> np.ndarray:
    """Rows shaped like the bundled model's: a body of sd 4.5 and 40 tokens 18-26 above its
    mean (about the same gaps below the best token; ~12% of the mass below 1e-4 of the
    best at temperature 2)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((rows, 262144)) * 4.5).astype(np.float32)
    for r in range(rows):
        logits[r, rng.choice(262144, 40, replace=False)] = rng.uniform(18, 26, 40)
    return logits


def dropped_mass(logits: np.ndarray, temperature: float, cut: float = 1e-4) -> np.ndarray:
    """Per row: the probability mass of the tokens below ``cut`` times the best one's."""
    z = (logits.astype(np.float64) - logits.max(axis=1, keepdims=True)) / temperature
    p = np.exp(z)
    return (p * (p < cut)).sum(axis=1) / p.sum(axis=1)


def load_sampler_module(path: str):
    """``path`` (a version of sampler.py) imported as a sibling of demesne.engine.sampler."""
    name = "demesne.engine._sampler_baseline"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def time_ms(modules: list, logits: np.ndarray, params: SamplingParams, reps: int, budget_s: float) -> list[tuple[float, float]]:
    """Milliseconds of one ``sample`` over all rows, (median, best) per module; the modules
    take turns so that load from elsewhere falls on all of them alike (at most ``budget_s``)."""
    rows = logits.shape[0]
    samplers = [module.Sampler(logits.shape[1], rows) for module in modules]
    rngs = [np.random.default_rng(i) for i in range(rows)]
    times: list[list[float]] = [[] for _ in modules]
    start = time.perf_counter()
    for rep in range(reps + 1):  # the first round warms up, untimed
        for sampler, spent in zip(samplers, times):
            sampler.prepare([params] * rows)
            t0 = time.perf_counter()
            sampler.sample(logits, rngs)
            if rep:
                spent.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and rep:
            break
    return [(statistics.median(spent) * 1e3, min(spent) * 1e3) for spent in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="the bundled model's logits")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--baseline", help="another sampler.py to time beside this one")
    args = parser.parse_args(argv)

    logits = real_logits(args.rows) if args.real else synthetic_logits(args.rows)
    print(f"logits: {'bundled model' if args.real else 'synthetic'}, {logits.shape[0]} rows x {logits.shape[1]}")
    for t in (1.0, 1.5, 2.0):
        d = dropped_mass(logits, t)
        print(f"mass below 1e-4 of the best at T={t}: mean {d.mean():.2%}, max {d.max():.2%}")
    modules = [("exact", current)]
    if args.baseline:
        modules.insert(0, ("baseline", load_sampler_module(args.baseline)))
    print(f"\nms to sample {args.rows} rows: median (best) of up to {args.reps}")
    print(f"{'case':<38}" + "".join(f"{name:>16}" for name, _ in modules))
    for label, params in CASES:
        cells = time_ms([module for _, module in modules], logits, params, args.reps, budget_s=20.0)
        print(f"{label:<38}" + "".join(f"{f'{med:.1f} ({best:.1f})':>16}" for med, best in cells), flush=True)


if __name__ == "__main__":
    main()
