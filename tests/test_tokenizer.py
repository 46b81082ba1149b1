"""demesne.gateway.tokenizer on the bundled Gemma 3 GGUF (vocabulary only): tokenize,
detokenize incrementally across byte-fallback tokens, and match stop strings across chunks."""

import itertools
import random

import pytest

from demesne.gateway.tokenizer import IncrementalDetokenizer, StopMatcher, Tokenizer
from demesne.model import resolve_model

MULTIBYTE = "naïve café 日本語 🙂"
# Characters rare enough that Gemma spells them with byte-fallback tokens, one byte each:
# an Egyptian hieroglyph, a flamingo, a CJK extension-A ideograph, Cyrillic monograph O, a
# mathematical Fraktur U.
RARE = "𓀀🦩䶵ꙮ𝔘"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def byte_tokens(tok) -> dict[int, int]:
    """byte value -> the byte-fallback token whose piece is exactly that one byte (>= 0x80)."""
    found = {}
    for t in range(tok.n_vocab):
        p = tok.piece(t)
        if len(p) == 1 and p[0] >= 0x80:
            found.setdefault(p[0], t)
    return found


# --- tokenize / detokenize ------------------------------------------------------------------


def test_vocabulary_size(tok):
    assert tok.n_vocab == 262144


@pytest.mark.parametrize("text", ["Hello, world! 123", "  leading and trailing  ", "a\nb\tc", MULTIBYTE, RARE])
def test_encode_decode_roundtrip(tok, text):
    ids = tok.encode(text, add_special=False)
    assert ids and all(0 <= i < tok.n_vocab for i in ids)
    assert tok.decode(ids) == text


def test_add_special_prepends_bos_which_decodes_to_nothing(tok):
    plain = tok.encode(MULTIBYTE, add_special=False)
    with_bos = tok.encode(MULTIBYTE)
    assert len(with_bos) == len(plain) + 1
    assert with_bos[1:] == plain
    assert tok.piece(with_bos[0]) == b""
    assert tok.decode(with_bos) == MULTIBYTE


def test_special_token_text_becomes_one_token(tok):
    ids = tok.encode("<start_of_turn>user", add_special=False)
    assert len(ids) == 2
    assert tok.piece(ids[0]) == b""  # a control token: no text
    assert tok.piece(ids[1]) == b"user"


def test_control_token_text_without_special_parsing_is_spelled_out(tok):
    ids = tok.encode("<start_of_turn>user", add_special=False, parse_special=False)
    assert 105 not in ids and len(ids) > 2
    assert tok.decode(ids) == "<start_of_turn>user"


def test_control_pattern_finds_control_tokens_only(tok):
    pattern = tok.control_pattern
    for text in ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unused5>", "</s>"):
        assert pattern.fullmatch(text), text
    # plain words, and user-defined tokens (which parse the same with special parsing off)
    for text in ("hello", "<start_of_turm>", "<table>", "<start_of_image>"):
        assert not pattern.fullmatch(text), text
    assert [m.group(0) for m in pattern.finditer("a<bos>b<start_of_turn><start_of_turm><unused12>")] == ["<bos>", "<start_of_turn>", "<unused12>"]


def test_encode_segments_parses_special_tokens_in_markup_only(tok):
    ids = tok.encode_segments([("<start_of_turn>user\n", True), ("<start_of_turn>", False), ("hi<end_of_turn>", True)])
    assert ids[0] == 2 and ids[1] == 105 and ids.count(105) == 1 and ids[-1] == 106
    assert tok.decode(ids) == "user\n<start_of_turn>hi"
    assert tok.encode_segments([("a<bos>", True)], add_special=False) == tok.encode("a<bos>", add_special=False)


def test_empty_text(tok):
    assert tok.encode("", add_special=False) == []
    assert tok.decode([]) == ""


def test_long_text_roundtrip(tok):
    text = ("The quick brown fox jumps over the lazy dog. 日本語 " * 200).strip()
    ids = tok.encode(text, add_special=False)
    assert len(ids) > 1000
    assert tok.decode(ids) == text


def test_multibyte_pieces_concatenate_to_utf8(tok):
    ids = tok.encode(MULTIBYTE, add_special=False)
    assert b"".join(tok.piece(i) for i in ids) == MULTIBYTE.encode("utf-8")


def test_piece_is_cached_and_stable(tok):
    ids = tok.encode("hello world", add_special=False)
    first = [tok.piece(i) for i in ids]
    assert [tok.piece(i) for i in ids] == first == [b"hello", b" world"]


def test_rare_characters_use_byte_fallback_tokens(tok, byte_tokens):
    # 0xF0 starts every 4-byte UTF-8 character; Gemma has a token for that lone byte.
    assert 0xF0 in byte_tokens and tok.piece(byte_tokens[0xF0]) == b"\xf0"
    ids = tok.encode("𓀀", add_special=False)
    assert [tok.piece(i) for i in ids] == [bytes([b]) for b in "𓀀".encode("utf-8")]
    assert tok.decode(ids) == "𓀀"


def test_decode_replaces_an_incomplete_character(tok, byte_tokens):
    assert tok.decode([byte_tokens[0xF0]]) == "\ufffd"


# --- incremental detokenizer ----------------------------------------------------------------


def stream_one_by_one(tok, ids):
    detok = IncrementalDetokenizer(tok)
    return [detok.add([i]) for i in ids], detok.flush()


@pytest.mark.parametrize("text", [MULTIBYTE, RARE, "x𓀀y 🦩z" + MULTIBYTE + "䶵"])
def test_incremental_detokenizer_one_token_at_a_time(tok, text):
    ids = tok.encode(text, add_special=False)
    steps, tail = stream_one_by_one(tok, ids)
    assert "".join(steps) + tail == text
    assert tail == ""
    emitted = ""
    for s in steps:
        assert "\ufffd" not in s
        emitted += s
        assert text.startswith(emitted)  # only whole characters, in order


def test_incremental_detokenizer_holds_back_a_split_character(tok):
    text = "a🦩b"
    ids = tok.encode(text, add_special=False)
    pieces = [tok.piece(i) for i in ids]
    # The flamingo really is split over several tokens here, one byte each.
    split = [i for i, p in enumerate(pieces) if len(p) == 1 and p[0] >= 0x80]
    assert len(split) == 4
    steps, _ = stream_one_by_one(tok, ids)
    for i in split[:-1]:
        assert steps[i] == ""  # the character is incomplete: nothing yet
    assert steps[split[-1]].startswith("🦩")  # its last byte completes it
    assert "".join(steps) == text


def test_incremental_detokenizer_in_uneven_batches(tok):
    text = RARE + " and " + MULTIBYTE
    ids = tok.encode(text, add_special=False)
    rng = random.Random(7)
    for _ in range(20):
        detok = IncrementalDetokenizer(tok)
        out, i = [], 0
        while i < len(ids):
            n = rng.randint(1, 4)
            out.append(detok.add(ids[i : i + n]))
            i += n
        assert all("\ufffd" not in s for s in out)
        assert "".join(out) + detok.flush() == text


def test_incremental_detokenizer_every_byte_token_alone(tok, byte_tokens):
    # Every 4-byte character starting with F0 9F (most emoji), fed as lone byte tokens.
    detok = IncrementalDetokenizer(tok)
    out = ""
    for ch in "🙂🦩🤖":
        for b in ch.encode("utf-8"):
            step = detok.add([byte_tokens[b]])
            assert step in ("", ch)
            out += step
    assert out == "🙂🦩🤖"


def test_incremental_detokenizer_invalid_bytes_become_replacement(tok, byte_tokens):
    a = tok.encode("a", add_special=False)
    detok = IncrementalDetokenizer(tok)
    assert detok.add([byte_tokens[0xF0]]) == ""
    assert detok.add(a) == "\ufffda"  # a lead byte followed by ASCII is invalid
    detok = IncrementalDetokenizer(tok)
    assert detok.add([byte_tokens[0xE6], byte_tokens[0x97]]) == ""
    assert detok.flush() == "\ufffd"  # generation ended mid-character


def test_incremental_detokenizer_control_tokens_are_silent(tok):
    ids = tok.encode("<start_of_turn>hi<end_of_turn>", add_special=False)
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add([i]) for i in ids) == "hi"


# --- stop strings ---------------------------------------------------------------------------


def run_chunks(stops, chunks):
    m = StopMatcher(stops)
    out = "".join(m.feed(c) for c in chunks)
    return out + m.flush(), m.stopped


def reference(text, stops):
    """What the client must see: the text up to the earliest stop string, or all of it."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def test_stop_split_at_every_position():
    text = "Hello there.\nUser: what now?"
    stop = "\nUser:"
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        chunks = [text[:i], text[i:j], text[j:]]
        out, stopped = run_chunks([stop], chunks)
        assert (out, stopped) == ("Hello there.", True), (i, j)


def test_stop_fed_one_character_at_a_time():
    text = "abc STOP def"
    m = StopMatcher(["STOP"])
    out = [m.feed(c) for c in text]
    assert "".join(out) == "abc "
    assert m.stopped
    assert m.flush() == ""


def test_nothing_after_a_stop_is_ever_emitted():
    m = StopMatcher(["##"])
    assert m.feed("one #") == "one "
    assert m.feed("# two") == ""
    assert m.stopped
    assert m.feed("three") == ""
    assert m.feed("##") == ""
    assert m.flush() == ""


def test_earliest_of_several_stops_wins():
    stops = ["World", "lo", "xyz"]
    text = "Hello World xyz"
    for i in range(len(text) + 1):
        assert run_chunks(stops, [text[:i], text[i:]]) == ("Hel", True)
    # Order in the list does not matter, position in the text does.
    assert run_chunks(["xyz", "World"], [text]) == ("Hello ", True)
    assert run_chunks(["World", "xyz"], [text]) == ("Hello ", True)


def test_stop_that_is_a_prefix_of_another():
    assert run_chunks(["ab", "abc"], ["xx", "a", "bc"]) == ("xx", True)
    assert run_chunks(["abc", "ab"], ["xxa", "b"]) == ("xx", True)


def test_held_back_prefix_is_released_when_it_is_no_stop():
    m = StopMatcher(["\nUser:"])
    assert m.feed("Hi\nUs") == "Hi"  # might begin the stop string: held back
    assert m.feed("e") == ""
    assert m.feed("ful") == "\nUseful"  # it did not
    assert m.feed("\nUse") == ""
    assert not m.stopped
    assert m.flush() == "\nUse"  # generation ended: the held text was no stop
    assert m.flush() == ""


def test_hold_back_only_what_could_begin_a_stop():
    m = StopMatcher(["END"])
    assert m.feed("The E") == "The "
    assert m.feed("xtra") == "Extra"
    assert m.feed("zz") == "zz"  # nothing that could start "END": no hold


def test_no_stop_strings_pass_text_straight_through():
    for stops in ([], [""]):
        m = StopMatcher(stops)
        for chunk in ["a", "\nUser:", "", "日本"]:
            assert m.feed(chunk) == chunk
        assert m.flush() == ""
        assert not m.stopped


def test_stop_at_the_very_start_and_end():
    assert run_chunks(["<"], ["<rest"]) == ("", True)
    assert run_chunks(["end"], ["the ", "end"]) == ("the ", True)
    assert run_chunks(["end"], ["the en"]) == ("the en", False)


def test_multibyte_stop_strings():
    text = "答えは42です。以上"
    for i in range(len(text) + 1):
        assert run_chunks(["です。"], [text[:i], text[i:]]) == ("答えは42", True)


def test_random_chunkings_match_the_reference():
    rng = random.Random(1234)
    alphabet = "ab\nU:"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        # No stop sits strictly inside another one, where "first to complete" and "first to
        # start" would differ (the matcher picks the earliest start of what it has seen).
        stops = [rng.choice(["\nU:", "aab", "ba", ":", "bbb", "a\na"]) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert run_chunks(stops, chunks) == reference(text, stops), (text, stops, chunks)


def test_control_tokens_a_tool_format_needs_come_through_as_text(model_path):
    """Mistral's [TOOL_CALLS] and Llama's <|python_tag|> are control tokens, empty when
    detokenized; the tool parser must see them. Gemma's <start_of_turn> stands in here."""
    tokenizer = Tokenizer(model_path)  # its own: the change sticks to the instance
    (token,) = tokenizer.encode("<start_of_turn>", add_special=False)
    assert tokenizer.piece(token) == b""
    tokenizer.render_special(("<start_of_turn>", "not one token"))
    assert tokenizer.decode(tokenizer.encode("a<start_of_turn>b", add_special=False)) == "a<start_of_turn>b"
