"""Constrained decoding on llguidance: a matcher per constrained sequence, masks for the batch.

A request's ``grammar`` is an llguidance grammar (Lark with inline ``%json`` schemas, or the
JSON form the gateway writes for a schema). It is compiled once per distinct text, in a
thread beside the step loop (llguidance drops the GIL), and kept in a small cache: each
request gets a copy of the compiled matcher. llguidance reports a token it refuses, a
grammar it cannot compile or a limit it hit; it never aborts the process, so none of those
can take the engine down.

A step treats a constrained row in one of two ways:

- **hot** rows (forced grammars from their first token; a lazy grammar once it has refused
  a token, i.e. once a tool call has opened) get their masks computed for the whole batch at
  once, in parallel in Rust, *while llama_decode runs*; after sampling, a row whose token the
  mask refuses is masked in place and sampled again;
- **cold** rows (a lazy grammar in free text) compute nothing: the sampled token is offered
  to the matcher, and only if it refuses is the row's mask computed there and then.

Sampling first and masking only on refusal draws from exactly the distribution the mask
would give (the rejected draw is thrown away and the next is drawn from the allowed tokens
alone), and most tokens a model writes inside a format are allowed, so most rows never touch
their 262,144 logits.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np

from ..protocol import MAX_GRAMMAR_REFS, MAX_GRAMMAR_RULES

log = logging.getLogger("demesne.engine")

# llguidance recurses along chains of rules and of $refs while it compiles (a chain of
# 5,000 rules overflows an 8 MiB stack: a segfault, nothing to catch). Compiles run on a
# thread with a large stack, and the engine holds a grammar's text to protocol's
# MAX_GRAMMAR_RULES and MAX_GRAMMAR_REFS (whoever sent it), far below what that stack holds.
COMPILE_STACK_BYTES = 256 << 20  # virtual; pages are committed only when touched
CACHE_ENTRIES = 128  # compiled grammars kept (a matcher holds its lexer's states)

_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][\w-]*(?:\[[^\]\n]*\])?(?:\.-?\d+)?[ \t]*:", re.M)


class GrammarError(ValueError):
    """The grammar does not compile, or is too big to compile safely."""


def grammar_problem(text: str) -> str | None:
    """Why ``text`` must not reach llguidance's compiler, or None. Cheap: two counts."""
    if len(_RULE.findall(text)) > MAX_GRAMMAR_RULES:
        return f"the grammar has more than {MAX_GRAMMAR_RULES} rules"
    if text.count('"$ref"') > MAX_GRAMMAR_REFS:
        return f"the grammar's JSON schemas hold more than {MAX_GRAMMAR_REFS} $refs"
    return None


def _limits() -> llguidance.LLParserLimits:
    # verbose_errors off: an error names the problem, not the grammar's whole state.
    return llguidance.LLParserLimits(verbose_errors=False)


class Constraint:
    """One sequence's matcher, and whether its masks are computed ahead (see the module)."""

    __slots__ = ("matcher", "hot")

    def __init__(self, matcher: llguidance.LLMatcher, hot: bool):
        self.matcher = matcher
        self.hot = hot

    def error(self) -> str:
        return self.matcher.get_error() or "the grammar refused the output"


class Constraints:
    """Compiles grammars for one vocabulary, and masks the constrained rows of each step."""

    def __init__(self, build_tokenizer: Callable[[], llguidance.LLTokenizer], n_vocab: int, max_rows: int, eos: int):
        self.n_vocab = n_vocab
        self.eos = eos  # what a row emits once its grammar is complete (whatever its logits say)
        self._words = (n_vocab + 31) // 32
        self.masks = np.zeros((max_rows, self._words), np.int32)  # bit t of row r: token t allowed
        self._cache: OrderedDict[str, llguidance.LLMatcher | str] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._compiler = _big_stack_pool(COMPILE_STACK_BYTES)  # builds the tokenizer, then compiles
        self._build_tokenizer = build_tokenizer
        self._tokenizer: Future | None = None
        self._masker = ThreadPoolExecutor(1, thread_name_prefix="demesne-masks")
        self._llg: llguidance.LLExecutor | None = None
        self._pending: Future | None = None
        self.compiled = 0  # grammars compiled (cache misses)
        self.masked_rows = 0  # row masks computed
        self.refused = 0  # sampled tokens a grammar refused (the row was masked and sampled again)
        self.mask_seconds = 0.0  # time spent computing masks ahead (on the mask thread)
        self.mask_wait_seconds = 0.0  # ...of which the step waited for, after llama_decode

    # -- compiling -----------------------------------------------------------------------

    def warm(self, wait: bool = False) -> None:
        """Build llguidance's tokenizer (seconds for a large vocabulary) on the compile thread,
        so that the first constrained request need not wait for it; ``wait``: until it is
        built (or failed: constrained requests then say so)."""
        if self._tokenizer is None:
            self._tokenizer = self._compiler.submit(_timed, self._build_tokenizer)
        if wait:
            self._tokenizer.exception()

    def compile(self, grammar: str, lazy: bool) -> Constraint | Future:
        """A constraint for ``grammar`` now if it was compiled before, else a future of one
        (compiled on the compile thread). Raises (or the future does) :class:`GrammarError`."""
        with self._cache_lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
        if template is None:
            problem = grammar_problem(grammar)
            if problem:
                raise GrammarError(problem)
            self.warm()
            return self._compiler.submit(self._compile, grammar, lazy)
        return _constraint(template, lazy)

    def _compile(self, grammar: str, lazy: bool) -> Constraint:
        try:
            tokenizer = self._tokenizer.result()  # (submitted before this compile: warm())
        except Exception as exc:  # noqa: BLE001 - every constrained request gets this, not a crash
            raise GrammarError(f"constrained decoding is unavailable: llguidance's tokenizer failed ({exc})") from None
        with self._cache_lock:  # another request may have compiled it meanwhile
            template = self._cache.get(grammar)
        if template is None:
            try:
                template = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_limits())
                template = template.get_error() if template.is_error() else template
            except BaseException as exc:  # noqa: BLE001 - Rust panics are BaseExceptions
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                template = f"{type(exc).__name__}: {exc}"
            self.compiled += 1
            with self._cache_lock:
                self._cache[grammar] = template
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        return _constraint(template, lazy)

    # -- masks ---------------------------------------------------------------------------

    def start_masks(self, rows: list[tuple[int, Constraint]]) -> None:
        """Begin computing the masks of the hot rows among ``rows`` ((mask slot, constraint)
        pairs: the sequence's index among the step's one-row outputs) on the mask thread; :meth:`wait` before reading them. Call it just before
        llama_decode, which runs meanwhile."""
        hot = [(c.matcher, row) for row, c in rows if c.hot]
        if hot:
            self.masked_rows += len(hot)
            self._pending = self._masker.submit(self._fill, hot)

    def _fill(self, hot: list[tuple[llguidance.LLMatcher, int]]) -> None:
        t0 = time.perf_counter()
        if self._llg is None:
            self._llg = llguidance.LLExecutor()
        self._llg.unsafe_compute_mask_ptr(hot, self.masks.ctypes.data, self._words * 4, self.masks.shape[0])
        self.mask_seconds += time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the masks started by :meth:`start_masks` are written."""
        pending, self._pending = self._pending, None
        if pending is not None:
            t0 = time.perf_counter()
            pending.result()
            self.mask_wait_seconds += time.perf_counter() - t0

    def pick(self, row: int, c: Constraint, token: int, logits: np.ndarray, resample: Callable[[], int]) -> int | None:
        """The token row ``row`` emits, fed to its matcher: the sampled ``token`` if the
        grammar allows it, else one ``resample()`` draws after the refused tokens of
        ``logits`` (the row, masked in place) are set to -inf. None when the grammar failed
        (an error inside llguidance, a limit it hit): the request must end."""
        if c.matcher.is_stopped() and not c.matcher.is_error():
            return self.eos  # the grammar is complete: the output ends (even with ignore_eos)
        if c.hot:
            allowed = bool((self.masks[row, token >> 5] >> (token & 31)) & 1)
        elif c.matcher.try_consume_tokens([token]) == 1:
            return token  # a cold row's matcher takes it there and then
        else:
            allowed = False
        if not allowed:
            if not self._mask(row, c, logits):
                return None
            token = resample()
        return token if c.matcher.consume_token(token) else None

    def _mask(self, row: int, c: Constraint, logits: np.ndarray) -> bool:
        """Set every token ``c`` refuses to -inf in ``logits`` (one row, in place); the row
        is hot from now on. False when the grammar allows no token at all (it failed)."""
        self.refused += 1
        if not c.hot:
            c.hot = True
            self.masked_rows += 1
            c.matcher.unsafe_compute_mask_ptr(self.masks[row].ctypes.data, self._words * 4)
        if c.matcher.is_error():
            return False
        refused = np.unpackbits(self.masks[row].view(np.uint8), bitorder="little")[: self.n_vocab] == 0
        if refused.all():
            return False
        logits[refused] = -np.inf
        return True

    def close(self) -> None:
        """Stop both threads; what is compiling finishes first (it reads the vocabulary, which
        must outlive it)."""
        self._masker.shutdown(wait=True)
        self._compiler.shutdown(wait=True, cancel_futures=True)


def _constraint(template: llguidance.LLMatcher | str, lazy: bool) -> Constraint:
    if isinstance(template, str):
        raise GrammarError(template)
    return Constraint(template.deep_copy(), hot=not lazy)


def _timed(build: Callable[[], llguidance.LLTokenizer]) -> llguidance.LLTokenizer:
    t0 = time.perf_counter()
    tokenizer = build()
    log.info("constrained decoding: llguidance tokenizer built in %.1f s", time.perf_counter() - t0)
    return tokenizer


def _big_stack_pool(stack_bytes: int) -> ThreadPoolExecutor:
    """A one-thread pool whose thread has ``stack_bytes`` of stack (the size applies to
    threads started while it is set; the pool starts its thread on the first submit). Where
    the system refuses a stack that large (a low ``ulimit -v``), a quarter of it, and so on."""
    while True:
        pool = ThreadPoolExecutor(1, thread_name_prefix="demesne-grammar")
        old = threading.stack_size(stack_bytes)
        try:
            pool.submit(lambda: None).result()
            return pool
        except RuntimeError:  # "can't start new thread"
            if stack_bytes <= 8 << 20:
                raise
            log.warning("cannot start a thread with %d MiB of stack; trying less", stack_bytes >> 20)
            stack_bytes //= 4
        finally:
            threading.stack_size(old)
