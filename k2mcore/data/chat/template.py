"""A K2-style chat template, and the Hugging Face tokenizer directory built around it.

The template writes Kimi-K2's chat format with the tokens of `tokenizers.K2_SPECIAL_TOKENS`:

    <|im_system|>system<|im_middle|>...<|im_end|>          (a default one when none is given)
    <|im_user|>user<|im_middle|>...<|im_end|>
    <|im_assistant|>assistant<|im_middle|>...<|im_end|>
    <|im_system|>tool<|im_middle|>## Return of ID\\n...<|im_end|>

An assistant turn's tool calls follow its content inside the turn:
`<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS
<|tool_call_end|>...<|tool_calls_section_end|>`, IDX counting the conversation's calls from 0 (K2's
call ids; a tool result names the call by its `tool_call_id`). `{% generation %}` covers what the
assistant writes — content, tool calls and its `<|im_end|>` — not the role header, so a model
trained on that mask learns to answer and to stop, never to write a user turn.
`add_generation_prompt` appends `<|im_assistant|>assistant<|im_middle|>`.

`write_tokenizer_dir` lays out a directory that `transformers.AutoTokenizer.from_pretrained` loads
(tokenizer.json + tokenizer_config.json with this template); tools/make_sample_assets.py makes
the bundled `assets/tokenizer/k2-tiny/` with it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from k2mcore.data.tokenizers import HF_CONFIG, PathLike

K2_DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."

# Every tag trims the whitespace around it ({%- -%}), so the layout below renders to nothing but
# the K2 text; the only newline in the output is the explicit one after "## Return of ID".
K2_CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
  {%- if content is string -%}
    {{ content }}
  {%- elif content is not none -%}
    {%- for part in content -%}
      {%- if part['type'] == 'text' -%}
        {{ part['text'] }}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(calls=0) -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- if not messages or messages[0]['role'] != 'system' -%}
  <|im_system|>system<|im_middle|>""" + K2_DEFAULT_SYSTEM + r"""<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- set name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'system' -%}
    <|im_system|>{{ name }}<|im_middle|>{{ render_content(message.get('content')) }}<|im_end|>
  {%- elif message['role'] == 'user' -%}
    <|im_user|>{{ name }}<|im_middle|>{{ render_content(message.get('content')) }}<|im_end|>
  {%- elif message['role'] == 'tool' -%}
    {%- if not message.get('tool_call_id') -%}
      {{ raise_exception('a tool message needs a tool_call_id') }}
    {%- endif -%}
    <|im_system|>tool<|im_middle|>## Return of {{ message['tool_call_id'] }}{{ '\n' }}
    {{- render_content(message.get('content')) }}<|im_end|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{ name }}<|im_middle|>
    {%- generation -%}
      {{ render_content(message.get('content')) }}
      {%- if message.get('tool_calls') -%}
        <|tool_calls_section_begin|>
        {%- for call in message['tool_calls'] -%}
          {%- set fn = call.get('function') or {} -%}
          {%- if not fn.get('name') -%}
            {{ raise_exception('a tool call needs a function name') }}
          {%- endif -%}
          <|tool_call_begin|>functions.{{ fn['name'] }}:{{ ns.calls }}<|tool_call_argument_begin|>
          {%- if fn.get('arguments') is string -%}
            {{ fn['arguments'] }}
          {%- else -%}
            {{ fn.get('arguments', {}) | tojson }}
          {%- endif -%}
          <|tool_call_end|>
          {%- set ns.calls = ns.calls + 1 -%}
        {%- endfor -%}
        <|tool_calls_section_end|>
      {%- endif -%}
      <|im_end|>
    {%- endgeneration -%}
  {%- else -%}
    {{ raise_exception('unknown role ' + message['role']) }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
""".strip()

# K2's named special tokens (tokenizer_config.json of Kimi-K2)
K2_CONFIG_TOKENS = {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]",
                    "unk_token": "[UNK]"}


def write_tokenizer_dir(
    tokenizer_json: PathLike,
    out_dir: PathLike,
    *,
    chat_template: str = K2_CHAT_TEMPLATE,
    config_tokens: Optional[dict[str, str]] = None,
    model_max_length: int = 1 << 20,
) -> Path:
    """`out_dir/tokenizer.json` (a byte copy: the same ids) + `tokenizer_config.json` with the
    chat template and the named special tokens (K2's by default); returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **(K2_CONFIG_TOKENS if config_tokens is None else config_tokens),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    (out / HF_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    return out
