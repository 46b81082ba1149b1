"""The Responses API request translated onto chat (gateway/responses.py), without a server."""

from __future__ import annotations

import pytest

from demesne.gateway.errors import ApiError
from demesne.gateway.response_store import ResponseStore
from demesne.gateway.responses import conversation, to_chat

CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}


def test_items_become_chat_messages():
    store = ResponseStore(4)
    body = {"input": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        CALL, {**CALL, "call_id": "c2"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "reasoning", "summary": []},
    ]}
    messages = conversation(body, store)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]  # consecutive calls are one turn
    chat = to_chat({"model": "m", "instructions": "Rules.", "max_output_tokens": 5, **body}, messages)
    assert chat["messages"][0] == {"role": "system", "content": "Rules."} and chat["max_tokens"] == 5


def test_a_continuation_never_changes_the_stored_conversation():
    store = ResponseStore(4)
    stored = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    store.put({"id": "resp_1"}, stored)
    messages = conversation({"previous_response_id": "resp_1", "input": [CALL]}, store)
    assert len(messages[-1]["tool_calls"]) == 2 and len(stored[-1]["tool_calls"]) == 1


def test_the_store_is_bounded_and_unknown_ids_are_404():
    store = ResponseStore(2)
    for i in range(3):
        store.put({"id": f"r{i}"}, [])
    with pytest.raises(ApiError) as err:
        store.get("r0")
    assert err.value.status == 404
    assert store.get("r2") == ({"id": "r2"}, [])
    ResponseStore(0).put({"id": "x"}, [])  # 0: nothing kept, no error
