"""Tokenizer and chat template on fixture tokenizer folders.

Oracle: HF transformers' `PreTrainedTokenizerFast` loaded from the same folder (its `apply_chat_template`,
`encode(add_special_tokens=False)` and `decode`); the incremental detokenizer is checked against the full decode.
"""

import json

import fixtures
import pytest
from transformers import PreTrainedTokenizerFast

from dsinfer.tokenizer import IncrementalDetokenizer, Tokenizer

# A template that uses the jinja features real checkpoints use: namespace, filters, tojson, loop variables,
# loop controls, and whitespace control under trim_blocks / lstrip_blocks.
FEATURE_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
    {%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endif -%}
{%- endfor -%}
{{ bos_token }}{{ ns.system }}
{% for m in messages if m['role'] != 'system' %}
    {% if m['content'] == 'STOP' %}{% break %}{% endif %}
{{ loop.index }}:{{ m['role'] | upper }}:{{ m['content'] | trim }}
    {% if m.get('tool_calls') %}<tool>{{ m['tool_calls'] | tojson }}</tool>{% endif %}
{% if not loop.last %}|{% endif %}
{% endfor %}
{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"""

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello world!"}],
    "system-multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "To be, or not to be?"},
        {"role": "assistant", "content": "That is the question."},
        {"role": "user", "content": "  naïve — 東京 🎭\n"},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ],
    "tool-calls": [
        {"role": "user", "content": "weather in 東京?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "東京"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "user", "content": "STOP"},
        {"role": "user", "content": "never rendered by the feature template"},
    ],
}


def make_folder(path, template=fixtures.V3_TEMPLATE):
    path.mkdir(parents=True, exist_ok=True)
    fixtures.write_tokenizer(path, template)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"v3": make_folder(root / "v3"), "r1": make_folder(root / "r1", fixtures.R1_TEMPLATE),
            "feature": make_folder(root / "feature", FEATURE_TEMPLATE)}


@pytest.fixture(scope="module")
def tok(folders):
    return Tokenizer.from_dir(folders["v3"])


@pytest.fixture(scope="module")
def hf(folders):
    return PreTrainedTokenizerFast.from_pretrained(folders["v3"])


# -- chat template ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("template_kwargs", [{}, {"thinking": True}, {"thinking": False}],
                         ids=["plain", "thinking", "no-thinking"])
@pytest.mark.parametrize("name", ["v3", "r1", "feature"])
def test_chat_template_renders_like_hf(folders, name, conversation, add_generation_prompt, template_kwargs):
    messages = CONVERSATIONS[conversation]
    ours = Tokenizer.from_dir(folders[name]).apply_chat_template(messages, add_generation_prompt, **template_kwargs)
    theirs = PreTrainedTokenizerFast.from_pretrained(folders[name]).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs)
    assert ours == theirs


def test_thinking_switch_changes_generation_prompt(tok):
    """Guards the test above against a template that ignores `thinking` (then it could not fail)."""
    m = CONVERSATIONS["single"]
    assert tok.apply_chat_template(m, thinking=True).endswith("<｜Assistant｜><think>")
    assert tok.apply_chat_template(m, thinking=False).endswith("<｜Assistant｜></think>")
    assert tok.apply_chat_template(m).endswith("<｜Assistant｜>")


# Snippets that lean on what HF puts in the template's environment: its tojson filter (options included),
# the variables it always passes (tools=None, documents=None), and the globals (namespace, dict, strftime_now).
ENVIRONMENT_SNIPPETS = {
    "tojson": "{{ messages | tojson }}",
    "tojson-indent": "{{ messages[0] | tojson(indent=2) }}",
    "tojson-sort-keys": "{{ messages[0] | tojson(sort_keys=True) }}",
    "tojson-separators": "{{ messages | tojson(separators=(',', ':')) }}",
    "tojson-ensure-ascii": "{{ messages[0]['content'] | tojson(ensure_ascii=True) }}",
    "tools-not-none": "{% if tools is not none %}TOOLS{% endif %}{{ messages[0]['content'] }}",
    "documents-not-none": "{% if documents is not none %}DOCS{% endif %}{{ messages[0]['content'] }}",
    "namespace-dict": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                      "{{ ns.n }}{{ dict(a=1, b='x') | tojson }}",
    "strftime-now": "{{ strftime_now('%Y') }}",
}


@pytest.mark.parametrize("name", list(ENVIRONMENT_SNIPPETS))
def test_template_environment_like_hf(tmp_path, name):
    make_folder(tmp_path, template=ENVIRONMENT_SNIPPETS[name])
    messages = [{"role": "user", "content": "naïve 東京", "zeta": 1, "alpha": [1, 2]}]
    ours = Tokenizer.from_dir(tmp_path).apply_chat_template(messages, add_generation_prompt=False)
    theirs = PreTrainedTokenizerFast.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False)
    assert ours == theirs


@pytest.mark.parametrize("form", ["jinja-file", "named-list"])
def test_template_from_jinja_file_or_named_list(tmp_path, form):
    if form == "jinja-file":
        make_folder(tmp_path, template=None)
        (tmp_path / "chat_template.jinja").write_text(fixtures.R1_TEMPLATE)
    else:
        make_folder(tmp_path, template=[{"name": "tool_use", "template": "unused {{ bos_token }}"},
                                        {"name": "default", "template": fixtures.R1_TEMPLATE}])
    m = CONVERSATIONS["system-multi-turn"]
    ours = Tokenizer.from_dir(tmp_path).apply_chat_template(m, add_generation_prompt=True)
    theirs = PreTrainedTokenizerFast.from_pretrained(tmp_path).apply_chat_template(
        m, tokenize=False, add_generation_prompt=True)
    assert ours == theirs and ours.endswith("<｜Assistant｜><think>\n")


@pytest.mark.parametrize("name", ["v3", "r1", "feature"])
@pytest.mark.parametrize("conversation", ["single", "system-multi-turn"])
def test_encode_chat_has_one_bos_at_start(folders, name, conversation):
    tok = Tokenizer.from_dir(folders[name])
    hf = PreTrainedTokenizerFast.from_pretrained(folders[name])
    messages = CONVERSATIONS[conversation]
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == hf.encode(rendered, add_special_tokens=False)


def test_encode_chat_adds_bos_when_template_does_not(tmp_path):
    make_folder(tmp_path, template="{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}")
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode_chat(CONVERSATIONS["single"])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


# -- encode / decode -------------------------------------------------------------------------------------------

TEXTS = ["hello", "The quick brown fox jumps over the lazy dog.", " leading space", "trailing space ",
         "a\nb\n\n  c\t", "naïve — 東京 🎭", "🎭", "é", "0123456789 +-*/=()", "x" * 300]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_adds_bos_once(tok, hf, text):
    plain = hf.encode(text, add_special_tokens=False)
    assert tok.encode(text) == [tok.bos_id] + plain
    assert tok.encode(text, add_bos=False) == plain
    assert tok.encode(fixtures.BOS + text) == [tok.bos_id] + plain      # a BOS already in the text is not doubled


def test_encode_empty_text(tok):
    assert tok.encode("") == [tok.bos_id]
    assert tok.encode("", add_bos=False) == []


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok, hf, text):
    ids = tok.encode(text)
    assert tok.decode(ids[1:]) == text
    assert tok.decode(ids) == text                                     # BOS is special: skipped by default
    assert tok.decode(ids, skip_special_tokens=False) == fixtures.BOS + text
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS + ["東京東京", "🎭a🎭b", "—" * 5, "Hello 🎭 world, naïve café."])
@pytest.mark.parametrize("with_bos", [False, True])
def test_incremental_detokenizer_deltas_sum_to_full_decode(tok, hf, text, with_bos):
    ids = tok.encode(text, add_bos=with_bos)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.step(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == hf.decode(ids, skip_special_tokens=True) == text


def test_multibyte_characters_really_span_several_tokens(tok):
    """Guards the detokenizer test: the fixture's byte-level BPE splits these characters across tokens."""
    ids = tok.encode("東京 🎭", add_bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)


# -- special tokens from the folder ----------------------------------------------------------------------------

@pytest.mark.parametrize("generation_config,model_config,expected", [
    (None, None, {1}),                                         # the tokenizer's eos_token only
    ({"eos_token_id": 5}, None, {1, 5}),
    ({"eos_token_id": [1, 5, 7]}, None, {1, 5, 7}),
    ({"eos_token_id": [5, 7]}, {"eos_token_id": 9}, {1, 5, 7}),  # generation_config.json wins over config.json
    (None, {"eos_token_id": 9}, {1, 9}),
    ({"bos_token_id": 0}, {"eos_token_id": [9, 10]}, {1, 9, 10}),
])
def test_eos_ids(tmp_path, generation_config, model_config, expected):
    make_folder(tmp_path)
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    tok = Tokenizer.from_dir(tmp_path, model_config)
    assert tok.eos_ids == expected
    assert tok.bos_id == 0 and tok.vocab_size == fixtures.VOCAB


# -- errors ----------------------------------------------------------------------------------------------------

def test_missing_tokenizer_json(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_unreadable_tokenizer_files(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("messages", [
    [], None, "hello", [{"content": "no role"}], [{"role": "robot", "content": "x"}],
    [{"role": "user", "content": "ok"}, {"role": "wizard", "content": "x"}], ["not a dict"],
], ids=["empty", "none", "string", "missing-role", "unknown-role", "unknown-role-later", "not-a-dict"])
def test_bad_messages(tok, messages):
    with pytest.raises(ValueError):
        tok.apply_chat_template(messages)
    with pytest.raises(ValueError):
        tok.encode_chat(messages)


def test_template_raise_exception_is_value_error(tmp_path):
    make_folder(tmp_path, template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                                   "{% endif %}{{ messages[0]['content'] }}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(ValueError, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_no_chat_template(tmp_path):
    make_folder(tmp_path, template=None)
    with pytest.raises(ValueError, match="chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATIONS["single"])
