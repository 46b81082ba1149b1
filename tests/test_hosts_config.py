"""Keys, engine lists and model cards: what lets engines and gateways live on separate hosts."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from demesne import curve
from demesne.config import ConfigError, EngineConfig, GatewayConfig
from demesne.engine.model_card import GGUFError, card_of, read_card
from demesne.gateway.models import KEEP_VOCABS, VocabCache, VocabError
from demesne.gateway.tokenizer import Tokenizer


@pytest.fixture
def keys(tmp_path):
    curve.keygen(str(tmp_path), "engine")
    curve.keygen(str(tmp_path), "gateway")
    return tmp_path


def test_keygen_writes_a_pair_with_a_private_secret(keys):
    public, secret = curve.public_key(str(keys / "engine.key")), curve.secret_key(str(keys / "engine.key_secret"))
    assert public == secret[0] and len(public) == 40  # z85 of 32 bytes
    assert stat.S_IMODE(os.stat(keys / "engine.key_secret").st_mode) == 0o600
    with pytest.raises(ConfigError, match="exists"):
        curve.keygen(str(keys), "engine")  # never overwrites a key in use
    with pytest.raises(ConfigError, match="no secret key"):
        curve.secret_key(str(keys / "engine.key"))
    with pytest.raises(ConfigError, match="not a key name"):
        curve.keygen(str(keys), "../elsewhere")


def test_tcp_engine_needs_keys_or_insecure(keys, model_path):
    with pytest.raises(ConfigError, match="--insecure"):
        EngineConfig(model=model_path, listen="tcp://10.0.0.5:5700")
    EngineConfig(model=model_path, listen="tcp://10.0.0.5:5700", insecure=True)
    EngineConfig(model=model_path, listen="tcp://10.0.0.5:5700", curve_key=str(keys / "engine.key_secret"), curve_clients=str(keys))
    with pytest.raises(ConfigError, match="go together"):
        EngineConfig(model=model_path, listen="tcp://10.0.0.5:5700", curve_key=str(keys / "engine.key_secret"))
    EngineConfig(model=model_path, listen="ipc:///tmp/x.sock")  # one box: no keys needed


def test_gateway_needs_keys_for_tcp_engines(keys):
    with pytest.raises(ConfigError, match="on TCP"):
        GatewayConfig(engines=("tcp://10.0.0.5:5700",))
    with pytest.raises(ConfigError, match="own --curve-key"):
        GatewayConfig(engines=("tcp://10.0.0.5:5700",), engine_key=str(keys / "engine.key"))
    GatewayConfig(engines=("tcp://10.0.0.5:5700",), insecure=True)
    GatewayConfig(engines=("tcp://10.0.0.5:5700",), engine_key=str(keys / "engine.key"), curve_key=str(keys / "gateway.key_secret"))


def test_engines_file_lines_name_their_keys(keys, tmp_path):
    listing = tmp_path / "engines.list"
    listing.write_text(
        "# comment\n\nipc:///run/demesne/engine-0.sock\n"
        f"tcp://10.0.0.5:5700 {keys / 'engine.key'}  # gpu host\n"
    )
    config = GatewayConfig(engines_file=str(listing), curve_key=str(keys / "gateway.key_secret"))
    assert config.engine_list() == [("ipc:///run/demesne/engine-0.sock", None), ("tcp://10.0.0.5:5700", str(keys / "engine.key"))]
    listing.write_text("tcp://10.0.0.6:5700\n")
    with pytest.raises(ConfigError, match="engines.list:1: engine tcp://10.0.0.6:5700 is on TCP"):
        config.engine_list()
    listing.write_text("ipc:///a.sock\nipc:///a.sock\n")
    with pytest.raises(ConfigError, match="listed twice"):
        config.engine_list()
    listing.write_text("ipc:///a.sock too many words\n")
    with pytest.raises(ConfigError, match="ENDPOINT"):
        config.engine_list()


def test_vocabulary_only_copy_tokenizes_like_the_model(model_path, tokenizer, tmp_path):
    card = read_card(model_path)
    assert card.vocab[:4] == b"GGUF" and len(card.vocab) < os.path.getsize(model_path) / 10
    assert card.vocab_digest == hashlib.sha256(card.vocab).hexdigest()
    assert card_of(card.vocab).vocab == card.vocab  # a copy of a copy is the same copy
    path = tmp_path / "vocab.gguf"
    path.write_bytes(card.vocab)
    vocab = Tokenizer(str(path))
    text = "Hello <start_of_turn>user\nwörld 😀 def f(x): return x**2"
    assert vocab.n_vocab == tokenizer.n_vocab and vocab.encode(text) == tokenizer.encode(text)
    assert vocab.decode(vocab.encode(text, add_special=False), special=True) == text


def test_fingerprint_names_the_model_not_the_file(model_path, tmp_path):
    data = bytearray(open(model_path, "rb").read())
    same = card_of(bytes(data))
    assert same.fingerprint == read_card(model_path).fingerprint  # another copy: the same model
    data[-1000] ^= 0xFF  # a weight near the end (the last sample covers it)
    assert card_of(bytes(data)).fingerprint != same.fingerprint
    with pytest.raises(GGUFError):
        card_of(bytes(data[:100_000]))  # cut inside the vocabulary
    with pytest.raises(GGUFError):
        card_of(b"GGML" + bytes(data[4:1000]))


def test_vocab_cache_checks_what_it_keeps(tmp_path):
    cache = VocabCache(str(tmp_path))
    data = b"GGUF" + os.urandom(64)
    digest = hashlib.sha256(data).hexdigest()
    assert cache.get(digest) is None
    path = cache.put(digest, data)
    assert cache.get(digest) == path and open(path, "rb").read() == data
    with pytest.raises(VocabError, match="does not match"):
        cache.put(digest, data + b"x")
    with pytest.raises(VocabError, match="not a vocabulary digest"):
        cache.put("../../etc/passwd", data)  # a digest from a peer never becomes a path
    open(path, "wb").write(b"corrupt")
    assert cache.get(digest) is None
    for i in range(KEEP_VOCABS + 3):
        blob = bytes([i]) * 10
        cache.put(hashlib.sha256(blob).hexdigest(), blob)
    assert len(list(tmp_path.glob("*.gguf"))) == KEEP_VOCABS


def test_vocab_cache_falls_back_where_it_cannot_write(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    cache = VocabCache(str(blocked / "vocab"))
    assert cache.directory != blocked / "vocab" and cache.directory.is_dir()
