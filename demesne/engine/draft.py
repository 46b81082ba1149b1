"""Drafts from a small model of the same vocabulary (``--draft-model``): speculate.py's second
source of guesses, for text that is not in the request already.

The draft model has its own llama.cpp context, one KV stream per sequence id as the target's
streams, and remembers the tokens each stream holds. To draft ``k`` tokens for some sequences
it first brings each stream up to its sequence (whatever it holds that is still a prefix of
the sequence stays: the rest of a refused draft goes, a slot taken by the same conversation
keeps its cells), then runs ``k`` greedy steps of one row per sequence, all of them in each
decode. A greedy draft puts all its mass on one token, so verification by sampling keeps the
target's distribution exactly (speculate.py).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ..config import EngineConfig
from .runner import DecodeError, ModelLoadError, ModelRunner
from .slots import common_prefix
from .speculate import StepCosts

log = logging.getLogger("demesne.engine")


def vocab_mismatch(n_vocab: int, draft_text, target_text) -> str | None:
    """Why two vocabularies differ (their sizes, or the first token whose text differs), or
    None when every token reads the same."""
    for token in range(n_vocab):
        if draft_text(token) != target_text(token):
            return f"token {token} is {draft_text(token)!r} in the draft model and {target_text(token)!r} in the model"
    return None


class DraftModel:
    def __init__(self, config: EngineConfig, target: ModelRunner):
        # The target's KV settings and offload; a stream per sequence id like the target's.
        draft_config = dataclasses.replace(config, model=config.draft_model, kv_layout="streams", draft_model=None, deterministic=False)
        self.runner = ModelRunner(draft_config)
        try:
            why = (
                f"the draft model has {self.runner.n_vocab} tokens and the model {target.n_vocab}"
                if self.runner.n_vocab != target.n_vocab
                else vocab_mismatch(target.n_vocab, self.runner.token_text, target.token_text)
            )
            if why:
                raise ModelLoadError(f"--draft-model {config.draft_model} has another vocabulary: {why}")
            self.held: list[list[int]] = [[] for _ in range(config.max_seqs)]  # tokens in each stream
            self.costs = StepCosts()  # one row per drafting sequence
            self.costs.calibrate(self.runner.time_rows, config.max_seqs)
        except Exception:  # noqa: BLE001 - closed, then raised: the engine decides
            self.runner.close()
            raise
        self.seconds = 0.0  # spent drafting, catching up included

    def draft(self, seqs: list, k: int) -> dict:
        """``k`` greedy tokens after each sequence's tokens; {} if the draft model fails (the
        target then decodes without drafts)."""
        try:
            drafts = self._catch_up(seqs)
            for _ in range(k - 1):
                batch = self.runner.batch
                batch.clear()
                for seq in seqs:
                    held = self.held[seq.seq_id]
                    held.append(drafts[seq][-1])
                    batch.add_span(held[-1:], len(held) - 1, seq.seq_id, True)
                rows = self.runner.decode()
                for row, seq in enumerate(seqs):
                    drafts[seq].append(int(rows[row].argmax()))
            return drafts
        except DecodeError as exc:
            log.warning("the draft model failed (%s); its streams start over", exc)
            for seq in seqs:
                self.runner.remove(seq.seq_id)
                self.held[seq.seq_id] = []
            return {}

    def _catch_up(self, seqs: list) -> dict:
        """Feed each stream what it lacks of its sequence, in decodes of at most the batch's
        capacity; the first draft token of each sequence from its last row."""
        pending = []
        for seq in seqs:
            held = self.held[seq.seq_id]
            keep = len(held) if held == seq.tokens[: len(held)] else common_prefix(np.asarray(held), np.asarray(seq.tokens))
            if keep == len(seq.tokens):
                keep -= 1  # the last token must be fed: its row gives the first draft token
            if keep < len(held):
                self.runner.remove(seq.seq_id, keep, -1)
                del held[keep:]
            pending.append(seq)
        drafts: dict = {}
        batch = self.runner.batch
        while pending:
            batch.clear()
            done = []
            for seq in pending:
                held = self.held[seq.seq_id]
                take = min(len(seq.tokens) - len(held), batch.capacity - batch.n_tokens)
                if take <= 0:
                    break
                start = len(held)
                last = start + take == len(seq.tokens)
                batch.add_span(seq.tokens[start : start + take], start, seq.seq_id, last)
                held.extend(seq.tokens[start : start + take])
                if last:
                    done.append(seq)
            rows = self.runner.decode()
            for row, seq in enumerate(done):
                drafts[seq] = [int(rows[row].argmax())]
            pending = [s for s in pending if s not in drafts]
        return drafts

    def close(self) -> None:
        self.runner.close()
