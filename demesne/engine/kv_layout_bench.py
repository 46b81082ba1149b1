"""A micro benchmark of llama.cpp's KV layouts under demesne's load shape: what a step costs
when the cache holds many sequences.

    python -m demesne.engine.kv_layout_bench [--rows 16] [--context 900] [--chunk 256] [--model PATH]

``rows`` sequences of ``context`` tokens each are prefilled; then timed: a decode step of one
token per sequence, and a step of ``rows - 1`` decode rows plus a ``chunk``-token prompt chunk
of one more sequence (the shape of a step that admits a request). For each layout: unified
(one cell pool for all sequences, with and without ``swa_full``) and
one stream per sequence (``kv_unified=false``, llama-server's default with ``-np``). Flash
attention as llama.cpp picks it (``auto``). Prints milliseconds; compare in one sitting.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import llama_cpp

from ..llama_logs import quiet_llama_logs
from ..model import resolve_model

LAYOUTS = [  # (name, kv_unified, swa_full)
    ("unified, swa_full (--kv-layout unified)", True, True),
    ("unified", True, False),
    ("streams", False, False),
    ("streams, swa_full (demesne's default)", False, True),
]


class Bench:
    def __init__(self, model, rows: int, context: int, chunk: int, unified: bool, swa_full: bool, threads: int):
        self.rows, self.context, self.chunk = rows, context, chunk
        params = llama_cpp.llama_context_default_params()
        per_seq = max(context + 64, chunk + 64)
        n_seqs = rows + 1  # and the one whose prompt arrives
        params.n_ctx = n_seqs * ((per_seq + 255) // 256 * 256)
        params.n_batch = params.n_ubatch = max(512, chunk + rows)
        params.n_seq_max = n_seqs
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = unified
        params.swa_full = swa_full
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise SystemExit("cannot create the context (too little memory?)")
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self.n = 0

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    def _put(self, token: int, pos: int, seq: int, output: bool) -> None:
        b, i = self.batch, self.n
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, output
        b.seq_id[i][0] = seq
        self.n += 1

    def _decode(self) -> float:
        self.batch.n_tokens, self.n = self.n, 0
        t0 = time.perf_counter()
        if llama_cpp.llama_decode(self.ctx, self.batch) != 0:
            raise SystemExit("llama_decode failed")
        return time.perf_counter() - t0

    def prefill(self) -> None:
        step = 512  # prompt chunks as --batch-size sends them by default
        for seq in range(self.rows):
            for c0 in range(0, self.context, step):
                n = min(step, self.context - c0)
                for j in range(n):
                    self._put(1000 + (seq * 7 + c0 + j) % 5000, c0 + j, seq, j == n - 1)
                self._decode()

    def decode_steps(self, steps: int) -> list[float]:
        out = []
        for k in range(steps):
            for seq in range(self.rows):
                self._put(2000 + seq, self.context + k, seq, True)
            out.append(self._decode())
        self.pos = self.context + steps
        return out

    def chunk_steps(self, steps: int) -> list[float]:
        out = []
        for k in range(steps):
            for j in range(self.chunk):
                self._put(3000 + (k * self.chunk + j) % 4000, k * self.chunk + j, self.rows, j == self.chunk - 1)
            for seq in range(self.rows - 1):
                self._put(2000 + seq, self.pos + k, seq, True)
            out.append(self._decode())
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--context", type=int, default=900, help="tokens each sequence holds")
    ap.add_argument("--chunk", type=int, default=256, help="prompt chunk of the arriving sequence")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    llama_cpp.llama_backend_init()
    quiet_llama_logs()
    logging.getLogger("demesne.llama").setLevel(logging.ERROR)  # the SWA-cache notices
    model = llama_cpp.llama_model_load_from_file(resolve_model(args.model).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise SystemExit("cannot load the model")
    print(f"{args.rows} sequences of {args.context} tokens; a prompt chunk of {args.chunk}; {args.threads} threads")
    print(f"{'layout':<30} {'decode step':>12} {'chunk + rows':>13}")
    for name, unified, swa_full in LAYOUTS:
        bench = Bench(model, args.rows, args.context, args.chunk, unified, swa_full, args.threads)
        try:
            bench.prefill()
            decode = statistics.median(bench.decode_steps(args.steps + 1)[1:])
            chunk = statistics.median(bench.chunk_steps(args.steps))
        finally:
            bench.close()
        print(f"{name:<30} {decode * 1000:>9.0f} ms {chunk * 1000:>10.0f} ms", flush=True)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
