"""tokenizer.py: the word-level tokenizer, a checkpoint's ids and chat formats, bad tokenizer files."""

import json

import pytest

import model as M
from tokenizer import LLAMA3_SYSTEM, build_tokenizer, load_tokenizer


WORDS = ["Stock", ":", "A", "B", "=", "3", "5", "0", "9", "sell", "->", ">", "?", "no"]


def test_word_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(WORDS)
    text = "Stock : A = 3 B = 5\nsell B 9 : 9 > 9 ? no -> B = 0"
    ids = tok.encode(text)
    assert len(ids) == len(text.split()) + 1  # one token a word, one for the newline
    assert tok.decode(ids) == text and tok.decode(ids + tok.eos_ids) == text and tok.pad_id not in ids
    unk = tok.encode("Stock x")
    assert tok.decode(unk) == "Stock" and len(unk) == 2  # an unknown word is <|unk|>, a special token
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.encode(text) == ids and back.eos_ids == tok.eos_ids and back.pad_id == tok.pad_id
    assert back.vocab_size == tok.vocab_size == 3 + 1 + 2 * len(WORDS)
    m = M.Transformer(M.tiny_config(tok.vocab_size))
    assert sum(p.numel() for p in m.parameters()) < 5e6


def test_tokenizer_ids_and_chat_formats(tmp_path):
    tok = build_tokenizer(WORDS)
    tok.tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|eot_id|>"])
    tok.save(tmp_path)
    im_end, eot = tok.tok.token_to_id("<|im_end|>"), tok.tok.token_to_id("<|eot_id|>")
    template = ("{%- if messages[0]['role'] == 'system' %}...{%- else %}{{- '<|im_start|>system\\nYou are Qwen, "
                "created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                                                "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, im_end]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": im_end, "pad_token_id": 0}))
    t = load_tokenizer(tmp_path)
    assert t.eos_ids == [eot, im_end] and t.pad_id == tok.tok.token_to_id("<|endoftext|>")
    assert t.chat_format == "chatml"
    assert t.chat("2+2?") == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                              "assistant.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert t.encode(t.chat("A", system=""), special=False)[:1] == [tok.tok.token_to_id("<|im_start|>")]

    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "<|start_header_id|> Cutting Knowledge Date"}))
    t = load_tokenizer(tmp_path)
    assert t.chat_format == "llama3" and t.eos_ids == [eot, im_end] and t.pad_id == 0
    assert t.chat("hi") == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM +
                            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    (tmp_path / "tokenizer_config.json").unlink()
    assert load_tokenizer(tmp_path).chat("hi") == "hi"  # base model: plain text


def test_bad_tokenizers(tmp_path):
    with pytest.raises(M.CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(M.CheckpointError, match="tokenizer.json: cannot be read"):
        load_tokenizer(tmp_path)
