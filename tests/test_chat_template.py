"""demesne.gateway.chat_template: the fallback, Hugging-Face-style templates, the sandbox, and
which template is picked."""

import datetime

import pytest

from demesne.gateway.chat_template import (
    FALLBACK_STOPS,
    FALLBACK_TEMPLATE,
    ChatTemplate,
    TemplateError,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "user", "content": "Bye"},
]

# Gemma-3-like: the system prompt is folded into the first user turn, roles must alternate,
# "assistant" is called "model". Written the way Hugging Face templates are (newlines after
# block tags, which trim_blocks removes, and "-" where an expression ends a line).
GEMMA_LIKE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}
{% set first_user_prefix = messages[0]['content'] + '\n\n' %}
{% set loop_messages = messages[1:] %}
{% else %}
{% set first_user_prefix = '' %}
{% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
{{- message['content'] | trim }}
{{- '<end_of_turn>\n' }}
{%- endfor %}
{% if add_generation_prompt %}
{{ '<start_of_turn>model\n' }}
{%- endif %}
"""

CHATML_LIKE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def fallback() -> ChatTemplate:
    return ChatTemplate.select(None, None, "<bos>", "<eos>")


# --- the built-in fallback ------------------------------------------------------------------


def test_fallback_every_role_with_generation_prompt():
    text = fallback().render(CONVERSATION, add_generation_prompt=True)
    assert text == ("<bos>Be brief.\n\nUser: Hi\nAssistant: Hello!\nTool result: {\"temp\": 21}\nUser: Bye\nAssistant:")


def test_fallback_without_generation_prompt():
    text = fallback().render(CONVERSATION, add_generation_prompt=False)
    assert text == "<bos>Be brief.\n\nUser: Hi\nAssistant: Hello!\nTool result: {\"temp\": 21}\nUser: Bye\n"


def test_fallback_generation_prompt_is_the_default():
    assert fallback().render([{"role": "user", "content": "x"}]) == "<bos>User: x\nAssistant:"


def test_fallback_single_user_turn_and_bos_of_the_model():
    t = ChatTemplate.select(None, None, "<s>", "</s>")
    assert t.render([{"role": "user", "content": "2+2?"}], add_generation_prompt=False) == "<s>User: 2+2?\n"


def test_fallback_does_not_autoescape_or_trim_content():
    content = "  <b>a & b</b>\n{{ not a template }}  "
    text = fallback().render([{"role": "user", "content": content}], add_generation_prompt=False)
    assert text == f"<bos>User: {content}\n"


def test_fallback_comes_with_its_stop_string():
    t = fallback()
    assert t.stops == FALLBACK_STOPS == ("\nUser:",)
    assert "fallback" in t.origin


# --- Hugging-Face-style templates -----------------------------------------------------------


def test_gemma_like_template_renders_exactly():
    t = ChatTemplate(GEMMA_LIKE, "<bos>", "<eos>", "test")
    messages = [m for m in CONVERSATION if m["role"] != "tool"]
    assert t.render(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert t.render(messages[1:2], add_generation_prompt=False) == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


def test_chatml_like_template_with_eos_token():
    t = ChatTemplate(CHATML_LIKE, "", "<|im_end|>", "test")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert t.render(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_end|>"
    )
    assert t.render(messages[:1]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_raise_exception_surfaces_as_template_error_with_its_message():
    t = ChatTemplate(GEMMA_LIKE, "<bos>", "<eos>", "test")
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_template_error_is_a_value_error():
    # The route turns ValueError from the template into a 400 on 'messages'.
    assert issubclass(TemplateError, ValueError)


def test_template_sees_tools_and_strftime_now():
    src = "{{ strftime_now('%Y') }}|{% for t in tools %}{{ t.function.name }};{% endfor %}"
    tools = [{"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "add"}}]
    out = ChatTemplate(src, "", "", "test").render([], tools=tools)
    year, names = out.split("|")
    assert int(year) in {datetime.datetime.now().year - 1, datetime.datetime.now().year, datetime.datetime.now().year + 1}
    assert names == "get_weather;add;"


def test_template_without_tools_sees_none():
    src = "{% if tools is none %}no tools{% else %}tools{% endif %}"
    assert ChatTemplate(src, "", "", "test").render([]) == "no tools"


def test_undefined_attribute_renders_empty():
    # Hugging Face templates probe optional keys (message.tool_calls); that must not fail.
    src = "{% for m in messages %}[{{ m.tool_calls }}]{% if m.tool_calls is defined %}X{% endif %}{% endfor %}"
    assert ChatTemplate(src, "", "", "test").render([{"role": "user", "content": "a"}]) == "[]"


# --- the sandbox -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_sandbox_refuses_unsafe_attribute_access(src):
    t = ChatTemplate(src, "", "", "test")
    with pytest.raises(TemplateError, match="unsafe") as info:
        t.render([{"role": "user", "content": "x"}])
    # The sandbox's SecurityError is wrapped, not leaked.
    assert type(info.value.__cause__).__name__ == "SecurityError"


def test_sandbox_hides_dunder_attributes():
    # A lone unsafe attribute is an undefined value (renders empty), never the real object.
    out = ChatTemplate("[{{ ''.__class__ }}][{{ messages.__class__ }}]", "", "", "test").render([])
    assert out == "[][]"


def test_sandbox_is_immutable():
    t = ChatTemplate("{% set xs = [] %}{{ xs.append(1) }}{{ xs }}", "", "", "test")
    with pytest.raises(TemplateError, match="unsafe"):
        t.render([])
    messages = [{"role": "user", "content": "x"}]
    t = ChatTemplate("{{ messages[0].update({'content': 'pwned'}) }}", "", "", "test")
    with pytest.raises(TemplateError):
        t.render(messages)
    assert messages[0]["content"] == "x"


def test_jinja_runtime_error_is_wrapped():
    # Calling an undefined name is a jinja2 UndefinedError: it must come out as TemplateError.
    t = ChatTemplate("{{ no_such_function('x') }}", "", "", "test")
    with pytest.raises(TemplateError, match="chat template failed"):
        t.render([])


def test_python_error_while_rendering_is_a_template_error():
    t = ChatTemplate("{{ messages | length // 0 }}", "", "", "test")
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "x"}])


def test_loop_controls_are_available_as_in_hugging_face():
    src = "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}{{ m.content }};{% endfor %}"
    t = ChatTemplate(src, "", "", "test")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert t.render(messages) == "a;"


# --- which template ---------------------------------------------------------------------------

MODEL_TEMPLATE = "MODEL{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"


def test_select_prefers_the_override_file(tmp_path):
    path = tmp_path / "override.jinja"
    path.write_text("FILE{{ bos_token }}{% for m in messages %}<{{ m.content }}>{% endfor %}{{ eos_token }}", encoding="utf-8")
    t = ChatTemplate.select(str(path), MODEL_TEMPLATE, "<bos>", "<eos>")
    assert t.render([{"role": "user", "content": "é"}]) == "FILE<bos><é><eos>"
    assert t.origin == f"file {path}"
    assert t.stops == ()


def test_select_uses_the_model_template_without_an_override():
    t = ChatTemplate.select(None, MODEL_TEMPLATE, "<bos>", "<eos>")
    assert t.render([{"role": "user", "content": "hi"}]) == "MODEL<bos>hi"
    assert t.stops == ()
    assert "model" in t.origin


def test_select_falls_back_without_either():
    for model_template in (None, ""):
        t = ChatTemplate.select(None, model_template, "<bos>", "<eos>")
        assert t.render([{"role": "user", "content": "hi"}]) == "<bos>User: hi\nAssistant:"
        assert t.stops == FALLBACK_STOPS


def test_select_override_file_beats_fallback_too(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("only {{ messages | length }}", encoding="utf-8")
    t = ChatTemplate.select(str(path), None, "<bos>", "<eos>")
    assert t.render([{"role": "user", "content": "hi"}] * 3) == "only 3"
    assert t.stops == ()


def test_select_missing_override_file_raises(tmp_path):
    with pytest.raises(OSError):
        ChatTemplate.select(str(tmp_path / "nope.jinja"), MODEL_TEMPLATE, "<bos>", "<eos>")


def test_fallback_template_constant_is_what_select_uses():
    a = ChatTemplate(FALLBACK_TEMPLATE, "<bos>", "<eos>", "x").render(CONVERSATION)
    assert a == fallback().render(CONVERSATION)
