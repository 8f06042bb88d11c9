"""Tokenizer.chat against renderings of the real chat templates, and the template through save_model.

The expected strings below are what transformers' apply_chat_template([{"role": "system", ...}?,
{"role": "user", ...}], tokenize=False, add_generation_prompt=True) rendered from these templates
(transformers 5.24), hard-coded so that the tests need neither transformers nor jinja. The templates
are the checkpoints' own: SmolLM2-135M-Instruct's (its newlines written as real newlines), Qwen2.5's
(written as \\n, with a second system branch for the caller's message), a ChatML one without a
default system prompt, Llama-3.1's system block and message loop (its tool branches left out: they
render nothing without tools) and Llama-3.0's.
"""

import json

import pytest

import model as M
from conftest import write_checkpoint
from tokenizer import build_tokenizer, chatml_system, load_tokenizer

QWEN25 = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) '
    'or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    'You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)

LLAMA31 = (
    '{{- bos_token }}\n'
    '{%- if not date_string is defined %}\n'
    '    {%- set date_string = "26 Jul 2024" %}\n'
    '{%- endif %}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set system_message = "" %}\n'
    '{%- endif %}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{{- system_message }}\n'
    '{{- "<|eot_id|>" }}\n'
    '{%- for message in messages %}\n'
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' }}\n"
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    '{%- endif %}\n'
)

LLAMA30 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n"
    '\n'
    "'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n"
    '\n'
    "' }}{% endif %}"
)

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
LLAMA_HEAD = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
              "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
Q1, Q2 = "What is 2+2?\n", "  Two lines\nof text \n"  # prompts as the project writes them: a trailing newline
CHATML_USER = {Q1: "<|im_start|>user\nWhat is 2+2?\n<|im_end|>\n<|im_start|>assistant\n",
               Q2: "<|im_start|>user\n  Two lines\nof text \n<|im_end|>\n<|im_start|>assistant\n"}
EXPECTED = {  # template -> {(prompt, system): apply_chat_template's text}
    "SMOLLM2": {(Q1, None): SMOL_SYSTEM + CHATML_USER[Q1], (Q2, None): SMOL_SYSTEM + CHATML_USER[Q2],
                ("Hi", "Be brief. "): "<|im_start|>system\nBe brief. <|im_end|>\n"
                                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"},
    "QWEN25": {(Q1, None): QWEN_SYSTEM + CHATML_USER[Q1], (Q2, None): QWEN_SYSTEM + CHATML_USER[Q2],
               ("Hi", "Be brief. "): "<|im_start|>system\nBe brief. <|im_end|>\n"
                                     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"},
    "CHATML": {(Q1, None): CHATML_USER[Q1], (Q2, None): CHATML_USER[Q2],
               ("Hi", "Be brief. "): "<|im_start|>system\nBe brief. <|im_end|>\n"
                                     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"},
    "LLAMA31": {
        (Q1, None): LLAMA_HEAD + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
        (Q2, None): LLAMA_HEAD + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nTwo lines\nof text<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("Hi", "Be brief. "): LLAMA_HEAD + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                           "<|start_header_id|>assistant<|end_header_id|>\n\n"},
    "LLAMA30": {
        (Q1, None): "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n",
        (Q2, None): "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTwo lines\nof text<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("Hi", "Be brief. "): "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                              "<|start_header_id|>assistant<|end_header_id|>\n\n"},
}
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tokenizer_folder(path, template, where="config", eos="<|im_end|>", gen_eos=None):
    """A tokenizer folder as a checkpoint has it: a tiny word-level tokenizer.json, tokenizer_config.json,
    and the template in tokenizer_config.json (transformers 4) or in chat_template.jinja (transformers 5)."""
    tok = build_tokenizer("What is 2+2? Hi Two lines of text".split())
    tok.tok.add_special_tokens(SPECIALS)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": "<|pad|>"}
    if where == "config":
        cfg["chat_template"] = template
    else:
        (path / "chat_template.jinja").write_text(template)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if gen_eos is not None:
        (path / "generation_config.json").write_text(
            json.dumps({"eos_token_id": [tok.tok.token_to_id(t) for t in gen_eos]}))
    return tok


@pytest.mark.parametrize("where", ["config", "jinja"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_chat_renders_like_apply_chat_template(tmp_path, name, where):
    tokenizer_folder(tmp_path, globals()[name], where)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format == ("llama3" if name.startswith("LLAMA") else "chatml")
    for (prompt, system), want in EXPECTED[name].items():
        assert tok.chat(prompt, system=system) == want, (name, prompt)
    first = "<|begin_of_text|>" if name.startswith("LLAMA") else "<|im_start|>"
    assert tok.encode(tok.chat(Q1), special=False)[0] == tok.tok.token_to_id(first)  # special tokens stay whole


def test_default_system_prompts_read_off_the_templates(tmp_path):
    expected = {"SMOLLM2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                # not "' + messages[0]['content'] + '"
                "QWEN25": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                "CHATML": None}
    for name, system in expected.items():
        assert chatml_system(globals()[name]) == system, name
    # double quotes, \n escapes
    assert chatml_system("{{ \"<|im_start|>system\\nTwo\\nlines<|im_end|>\\n\" }}") == "Two\nlines"


@pytest.mark.parametrize("where", ["config", "jinja"])
@pytest.mark.parametrize("name", ["SMOLLM2", "LLAMA31"])
def test_save_model_keeps_the_chat_template_and_end_ids(tmp_path, name, where):
    eos = "<|eot_id|>" if name == "LLAMA31" else "<|im_end|>"
    tok = tokenizer_folder(tmp_path / "src", globals()[name], where, eos=eos, gen_eos=["<|eot_id|>", "<|im_end|>"])
    write_checkpoint(tmp_path / "src", "llama", vocab_size=tok.vocab_size)
    model, before = M.load_model(tmp_path / "src", device="cpu"), load_tokenizer(tmp_path / "src")
    M.save_model(model, tmp_path / "saved", tokenizer=before)
    after = load_tokenizer(tmp_path / "saved")
    assert after.chat_format == before.chat_format and after.system == before.system
    assert after.chat(Q1) == before.chat(Q1) == EXPECTED[name][(Q1, None)]
    assert after.eos_ids == before.eos_ids == [tok.tok.token_to_id("<|eot_id|>"), tok.tok.token_to_id("<|im_end|>")]
    assert after.pad_id == before.pad_id == tok.pad_id
    saved_template = ((tmp_path / "saved" / "chat_template.jinja").read_text() if where == "jinja" else
                      json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["chat_template"])
    assert saved_template == globals()[name]  # where transformers 5 (jinja) and 4 (config) look for it
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["eos_token_id"] == after.eos_ids


def test_no_template_is_plain_text(tmp_path):
    tokenizer_folder(tmp_path, "", "config")
    tok = load_tokenizer(tmp_path)
    assert tok.chat_format is None and tok.chat(Q1) == Q1
