"""encode_chat: the tokenizer directory's chat template, equal to transformers' apply_chat_template
(ids and assistant mask); the plain option for special-token text in content."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.data_helpers import CONVERSATIONS, TOKENIZER_DIR, TOKENIZER_JSON
from k2mcore.data import encode_chat
from k2mcore.data.chat.encoding import load_chat_tokenizer
from k2mcore.data.chat.template import K2_CHAT_TEMPLATE, write_tokenizer_dir
from k2mcore.data.tokenizers import K2_SPECIAL_TOKENS

BASE = 1024 - 256  # k2-tiny's first special id
ID = {name: BASE + off for off, name in K2_SPECIAL_TOKENS.items()}


def _hf(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def hf():
    return _hf(TOKENIZER_DIR)


def _reference(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_equals_transformers(hf, i):
    ids, mask = encode_chat(CONVERSATIONS[i], TOKENIZER_DIR)
    assert (ids, mask) == _reference(hf, CONVERSATIONS[i])
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)


def test_k2_format_and_what_the_mask_covers(hf):
    """The rendered text is K2's, and the mask is exactly the assistant turns' bodies + im_end."""
    messages = CONVERSATIONS[2]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant "
                           "created by Moonshot AI.<|im_end|><|im_user|>user<|im_middle|>")
    assert ("<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
            "functions.lookup_docstring:0<|tool_call_argument_begin|>{\"name\": \"os.path.join\"}"
            "<|tool_call_end|><|tool_calls_section_end|><|im_end|>") in text
    assert ("<|tool_call_begin|>functions.lookup_docstring:2<|tool_call_argument_begin|>"
            '{"name": "os.walk", "n": 2}<|tool_call_end|>') in text
    assert "<|im_system|>tool<|im_middle|>## Return of functions.lookup_docstring:1\nWalk a tree." \
        "<|im_end|>" in text
    prompt = hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_user|>user<|im_middle|>Look up `os.path.join`.<|im_end|>"
                           "<|im_assistant|>assistant<|im_middle|>")
    ids, mask = encode_chat(messages, TOKENIZER_DIR)
    call = "<|tool_call_begin|>functions.lookup_docstring:{}<|tool_call_argument_begin|>{}" \
        "<|tool_call_end|>"
    assert hf.decode([t for t, m in zip(ids, mask) if m]) == (
        "<|tool_calls_section_begin|>" + call.format(0, '{"name": "os.path.join"}')
        + "<|tool_calls_section_end|><|im_end|>"
        "It joins path components.<|im_end|>"
        "Let me look.<|tool_calls_section_begin|>" + call.format(1, '{"name": "os.walk"}')
        + call.format(2, '{"name": "os.walk", "n": 2}') + "<|tool_calls_section_end|><|im_end|>"
        "Both say: it walks a tree.<|im_end|>")
    assert ID["<|im_assistant|>"] not in [t for t, m in zip(ids, mask) if m]  # headers untrained
    # each assistant turn starts right after <|im_middle|> and ends with its <|im_end|>
    for j, (t, m) in enumerate(zip(ids, mask)):
        if m and not mask[j - 1]:
            header = max(k for k in range(j) if ids[k] == ID["<|im_assistant|>"])
            assert hf.decode(ids[header:j]) == "<|im_assistant|>assistant<|im_middle|>"
        if m and (j + 1 == len(ids) or not mask[j + 1]):
            assert t == ID["<|im_end|>"]


def test_special_text_in_content_is_parsed_by_default(hf):
    """As transformers does: "<|im_end|>" typed by the user becomes the control token."""
    messages = CONVERSATIONS[3]
    ids, _ = encode_chat(messages, TOKENIZER_DIR)
    plain, _ = encode_chat(messages, TOKENIZER_DIR, special_tokens_in_content="plain")
    assert ids.count(ID["<|im_end|>"]) == plain.count(ID["<|im_end|>"]) + 2  # 2 in content
    assert ID["[EOS]"] in ids and ID["[EOS]"] not in plain
    assert ids.count(ID["<|im_assistant|>"]) == 2 and plain.count(ID["<|im_assistant|>"]) == 1


@pytest.mark.parametrize("i", [3, 4])
def test_plain_keeps_special_text_as_text(hf, i):
    messages = CONVERSATIONS[i]
    ids, mask = encode_chat(messages, TOKENIZER_DIR, special_tokens_in_content="plain")
    parsed, parsed_mask = encode_chat(messages, TOKENIZER_DIR)
    text = hf.apply_chat_template(messages, tokenize=False)
    assert hf.decode(ids) == text  # the same text, content decodes back
    # only the template's special tokens are special ids: the specials of the same conversation
    # with every special name removed from its content
    stripped = [{**m, "content": m["content"].replace("<|im_end|>", "").replace("[EOS]", "")
                 .replace("<|im_assistant|>", "").replace("<|im_system|>", "")
                 .replace("<|im_middle|>", "").replace("<|reserved_token_800|>", "")}
                for m in messages]
    template_specials = [t for t in encode_chat(stripped, TOKENIZER_DIR)[0] if t >= BASE]
    assert [t for t in ids if t >= BASE] == template_specials
    assert len([t for t in parsed if t >= BASE]) > len(template_specials)
    # content is tokenized as the text path tokenizes the same string
    from k2mcore.data.tokenizers import load_tokenizer

    plain = load_tokenizer(TOKENIZER_JSON)
    user = messages[-2]["content"]
    assert hf.decode(plain.encode(user)) == user
    assert _contains(ids, plain.encode(user))
    # the assistant mask covers the same text
    assert hf.decode([t for t, m in zip(ids, mask) if m]) == \
        hf.decode([t for t, m in zip(parsed, parsed_mask) if m])


def _contains(seq, sub):
    return any(seq[k:k + len(sub)] == sub for k in range(len(seq) - len(sub) + 1))


def test_plain_machinery_without_special_text_equals_parse():
    """The piecewise plain path, forced on conversations without special text, gives the ids
    and mask of the whole-text path (so plain mode changes only the marked text)."""
    chat = load_chat_tokenizer(TOKENIZER_DIR)
    for messages in CONVERSATIONS[:3]:
        valid = [{k: v for k, v in m.items() if v is not None} for m in messages]
        text, spans = chat._render_one(valid, None, "x")
        assert chat._encode_marked(text, spans) == chat._encode_parsed(valid, None, "x")


def test_template_variables_and_chat_template_file(tmp_path):
    """Another template: transformers' variables (bos_token) and chat_template.jinja, which
    takes precedence over the config's entry."""
    d = write_tokenizer_dir(TOKENIZER_JSON, tmp_path / "tok", chat_template="{{ nonsense(")
    (d / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}"
        "A: {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n"
        "{% else %}{{ m.role | upper }}: {{ m.content }}\n{% endif %}{% endfor %}")
    messages = CONVERSATIONS[1]
    ids, mask = encode_chat(messages, d)
    assert (ids, mask) == _reference(_hf(d), messages)
    assert ids[0] == ID["[BOS]"] and ids.count(ID["[EOS]"]) == 2


def test_tokenizer_is_loaded_once():
    assert load_chat_tokenizer(TOKENIZER_DIR) is load_chat_tokenizer(str(TOKENIZER_DIR) + "/")


def test_shipped_directory_is_the_generated_one(tmp_path):
    d = write_tokenizer_dir(TOKENIZER_JSON, tmp_path / "k2-tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (d / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"] == K2_CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) \
        == ("[BOS]", "[EOS]", "[PAD]", "[UNK]")


def test_importing_the_data_package_does_not_import_transformers():
    code = ("import sys, k2mcore.data, k2mcore.data.chat.encoding, k2mcore.data.chat.preprocess, "
            "k2mcore.data.chat.dataset, k2mcore.cli.preprocess; "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


TOOLS = [{"type": "function", "function": {
    "name": "lookup_docstring", "description": "The docstring of a stdlib name.",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                   "required": ["name"]}}}]


def test_tool_schemas_are_rendered_as_transformers_does(hf):
    messages = CONVERSATIONS[2]
    ids, mask = encode_chat(messages, TOKENIZER_DIR, tools=TOOLS)
    out = hf.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert (ids, mask) == (list(out["input_ids"]), list(out["assistant_masks"]))
    text = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert text.startswith("<|im_system|>tool_declare<|im_middle|>[{\"type\": \"function\"")
    assert sum(mask) == sum(encode_chat(messages, TOKENIZER_DIR)[1])  # declarations untrained
