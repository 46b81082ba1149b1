"""llama-server's token utilities on demesne (issue 11): /tokenize, /detokenize,
/apply-template and /props, against the real gateway and model."""

from __future__ import annotations

import aiohttp
import pytest

from demesne.engine.model_card import read_card

from test_e2e_api import openai_client

pytestmark = pytest.mark.e2e


async def post(http, server, path: str, body) -> tuple[int, dict]:
    async with http.post(f"{server.url}{path}", json=body) as r:
        return r.status, await r.json()


async def test_tokenize_matches_the_model_tokenizer(server, http, tokenizer):
    text = "Hello world <start_of_turn> déjà vu 日本"
    status, out = await post(http, server, "/tokenize", {"content": text})
    assert status == 200 and out["tokens"] == tokenizer.encode(text, add_special=False)
    assert tokenizer.one_token("<start_of_turn>") in out["tokens"]  # parse_special defaults on
    _, spelled = await post(http, server, "/tokenize", {"content": text, "parse_special": False})
    assert tokenizer.one_token("<start_of_turn>") not in spelled["tokens"]
    _, bos = await post(http, server, "/tokenize", {"content": text, "add_special": True})
    assert bos["tokens"] == tokenizer.encode(text, add_special=True) and len(bos["tokens"]) == len(out["tokens"]) + 1


async def test_tokenize_with_pieces_spells_the_text(server, http):
    text = "naïve 日本の首都"
    status, out = await post(http, server, "/tokenize", {"content": text, "with_pieces": True})
    assert status == 200 and all(isinstance(t["id"], int) for t in out["tokens"])
    raw = b"".join(t["piece"].encode() if isinstance(t["piece"], str) else bytes(t["piece"]) for t in out["tokens"])
    assert raw.decode() == text


async def test_detokenize_round_trips_tokenize(server, http):
    text = "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>"
    _, tok = await post(http, server, "/tokenize", {"content": text, "add_special": True})
    status, out = await post(http, server, "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and out["content"] == "<bos>" + text


@pytest.mark.parametrize("body,param", [
    ({"tokens": [1, 10**9]}, "tokens"),
    ({"tokens": [-1]}, "tokens"),
    ({"tokens": [True]}, "tokens"),
    ({"tokens": "12"}, "tokens"),
    ({}, "tokens"),
])
async def test_detokenize_refuses_what_is_not_token_ids(server, http, body, param):
    status, out = await post(http, server, "/detokenize", body)
    assert status == 400 and out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({}, "content"),
    ({"content": 5}, "content"),
    ({"content": "x", "add_special": "yes"}, "add_special"),
    ({"content": "x", "model": 3}, "model"),
])
async def test_tokenize_refuses_bad_fields(server, http, body, param):
    status, out = await post(http, server, "/tokenize", body)
    assert status == 400 and out["error"]["param"] == param


async def test_apply_template_gives_the_prompt_chat_completions_sends(server, http, model_id, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    status, out = await post(http, server, "/apply-template", {"messages": messages})
    assert status == 200 and "Name a colour." in out["prompt"] and "Be brief." in out["prompt"]
    chat = await openai_client(server).chat.completions.create(model=model_id, messages=messages, max_tokens=1)
    bos = not out["prompt"].startswith("<bos>")
    assert chat.usage.prompt_tokens == len(tokenizer.encode(out["prompt"], add_special=bos))
    status, out = await post(http, server, "/apply-template", {"messages": []})
    assert status == 400 and out["error"]["param"] == "messages"


async def test_props_describe_the_model(server, http, model_id, model_path):
    async with http.get(f"{server.url}/props") as r:
        assert r.status == 200
        props = await r.json()
    async with http.get(f"{server.v1}/models/{model_id}") as r:
        card = await r.json()
    assert props["model"] == model_id and props["n_ctx"] == card["context_length"] > 0
    assert props["default_generation_settings"]["n_ctx"] == props["n_ctx"]
    assert props["n_vocab"] == 262144 and props["bos_token"] == "<bos>" and props["chat_template"]
    assert props["model_fingerprint"] == read_card(model_path).fingerprint  # as the engine reports it
    async with http.get(f"{server.url}/props", params={"model": model_id}) as r:
        assert (await r.json())["model"] == model_id
    async with http.get(f"{server.url}/props", params={"model": "no-such-model"}) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("method,path", [("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/apply-template"), ("GET", "/props")])
async def test_the_utilities_need_the_api_key(server, method, path):
    async with aiohttp.ClientSession() as anonymous, anonymous.request(method, f"{server.url}{path}", json={}) as r:
        assert r.status == 401
