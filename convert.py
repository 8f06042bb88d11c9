"""Turn a GGUF file (llama.cpp's format) of a Llama / Qwen2 / Mistral model into a Hugging Face folder
that model.load_model, tokenizer.load_tokenizer and transformers open:

    pip install gguf        # llama.cpp's own reader (0.19 tested); needed by this script only
    python convert.py SmolLM2-135M-Instruct.Q4_1.gguf ckpt/smollm2-135m-instruct

It writes config.json (from the file's metadata), model.safetensors (Hugging Face parameter names,
dequantized), tokenizer.json (built with the `tokenizers` library from the file's vocabulary, merges
and special tokens), tokenizer_config.json (chat template, bos / eos / pad tokens) and
generation_config.json (end ids). A file it cannot convert gets one line naming the file and the
problem, exit status 1, and nothing written.

A quantized file gives its quantized weights back, dequantized: a Q4_1 file gives the Q4_1 weights,
not the bfloat16 weights the original checkpoint holds; the quantization error stays in the model.

Choices that are ours:
1. Weights are written in float32 (--dtype bfloat16 halves the file). Dequantization is gguf's
   (gguf.quants.dequantize, llama.cpp's reference code in numpy): F32, F16, BF16, Q8_0, Q4_0, Q4_1,
   which the tests check against a hand-written reference, and Q5_0, Q5_1, Q2_K..Q6_K (what a
   "Q4_K_M" file holds), used as gguf gives them. Any other type is refused.
2. llama.cpp stores the Q and K projections of llama-family models with the two halves of each
   head's rotary dimensions interleaved; they are put back in Hugging Face's order. Qwen2 files are
   stored unpermuted and copied as they are.
3. A Mistral file says architecture "llama" (llama.cpp converts Mistral as Llama): it becomes a
   LlamaForCausalLM, the same network. The tied head follows the file: no output.weight, tied.
4. The tokenizer is byte-level BPE only (tokenizer.ggml.model "gpt2": SmolLM2, Qwen2, Llama-3;
   SentencePiece files such as Llama-2 / Mistral-7B-v0.1 are refused). Its split rule comes from
   tokenizer.ggml.pre, the name llama.cpp gives it: "smollm" (digits one by one, then GPT-2's
   pattern), "qwen2" (with the NFC normalization of Qwen2's own tokenizer.json), "llama-bpe"
   (Llama-3), "gpt-2"; any other name is refused rather than guessed.
   Tokens the file marks as control become special tokens, user-defined ones added tokens.
5. End ids: the file's eos, eot and eom ids, in that order. A Llama-3 rope_freqs tensor is read
   back into llama3 rope scaling settings (factor, low/high frequency factors, original context).
6. OUT_DIR must not exist (--overwrite replaces it). Everything is written into a temporary folder
   next to it, checked (shapes against the config, the tokenizer loaded back), then renamed.
"""

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

import model as M
from tokenizer import load_tokenizer


class ConvertError(ValueError):
    """A file this script cannot convert; the message is one line."""


ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DEQUANTIZED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

# ---- reading the file ----


def field_value(f, gguf):
    """A metadata value as Python: str, int / float / bool, or a list of them. A float32 is read as
    the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06)."""
    T = gguf.GGUFValueType
    text = lambda i: bytes(f.parts[i]).decode("utf-8")
    value = lambda i: float(str(f.parts[i][0])) if f.types[-1] == T.FLOAT32 else f.parts[i][0].item()
    if f.types[0] == T.ARRAY:
        return [text(i) if f.types[-1] == T.STRING else value(i) for i in f.data]
    return text(f.data[0]) if f.types[0] == T.STRING else value(f.data[0])


def read_gguf(file: Path):
    """(metadata dict, {name: reader tensor}) through gguf's reader, which memory-maps the file."""
    import gguf
    try:
        reader = gguf.GGUFReader(file)
        meta = {k: field_value(f, gguf) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        tensors = {t.name: t for t in reader.tensors}
    except Exception as e:  # numpy / gguf errors of a truncated or foreign file
        raise ConvertError(f"{file}: not a GGUF file, or a truncated one ({type(e).__name__}: {e})") from None
    return meta, tensors


def dequantize(t, dtype) -> torch.Tensor:
    """A reader tensor as a torch tensor of Hugging Face's shape (GGUF lists dimensions innermost first)."""
    import gguf
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)  # a copy
    return torch.from_numpy(w).to(dtype)


# ---- config ----

def model_config(meta: dict, tensors: dict, where: str) -> M.ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ConvertError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None or isinstance(v, list):
            raise ConvertError(f"{where}: metadata {arch}.{key} is {'missing' if v is None else 'a list (per layer)'}")
        return v

    if "token_embd.weight" not in tensors:
        raise ConvertError(f"{where}: no token_embd.weight tensor")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim or get("rope.dimension_count", head_dim) != head_dim:
        raise ConvertError(f"{where}: value length or rotary dimensions differ from the head size {head_dim}: "
                           "not supported")
    rope = None
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling != "none":
        raise ConvertError(f"{where}: rope scaling {scaling!r} is not supported (supported: none, linear, llama3)")
    bias = "blk.0.attn_q.bias" in tensors
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id")
           if k in meta]
    eos = list(dict.fromkeys(eos))  # choice 5
    cfg = M.ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]), hidden_size=hidden,
        intermediate_size=get("feed_forward_length"), num_hidden_layers=get("block_count"),
        num_attention_heads=heads, num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope, max_position_embeddings=get("context_length"),
        tie_word_embeddings="output.weight" not in tensors, qkv_bias=arch == "qwen2" or bias,
        o_bias=arch == "llama" and bias, architecture=ARCHS[arch],
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=(eos[0] if len(eos) == 1 else eos) or None,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if "rope_freqs.weight" in tensors:
        cfg.rope_scaling = llama3_rope(cfg, dequantize(tensors["rope_freqs.weight"], torch.float32), where)
    return cfg


def llama3_rope(cfg: M.ModelConfig, factors: torch.Tensor, where: str) -> dict:
    """The llama3 rope settings that divide the frequencies by `factors` (D/2,), as llama.cpp's
    converter computed them. Its inputs are not stored: the usual ones are tried (choice 5)."""
    plain = M.rope_inv_freq(M.ModelConfig(**{**cfg.__dict__, "rope_scaling": None}))
    for old_len in (8192, 4096, 2048, 16384, 32768):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            s = {"rope_type": "llama3", "factor": round(float(factors.max()), 3), "low_freq_factor": low,
                 "high_freq_factor": high, "original_max_position_embeddings": old_len}
            if torch.allclose(plain / M.rope_inv_freq(M.ModelConfig(**{**cfg.__dict__, "rope_scaling": s})), factors,
                              rtol=1e-4):
                return s
    raise ConvertError(f"{where}: rope_freqs.weight matches no llama3 rope scaling settings tried")


# ---- weights ----

BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def hf_name(name: str, where: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in BLOCK_NAMES:
        raise ConvertError(f"{where}: tensor {name} has no Hugging Face counterpart in this architecture")
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of a Q or K weight (n_head * D, C) or bias (n_head * D,):
    llama.cpp reorders each head's rows from [first half; second half] to pairs (i, i + D/2) side by
    side; this puts row h*D + 2i + j back at h*D + j*D/2 + i (choice 2)."""
    D = w.shape[0] // n_head
    return w.reshape(n_head, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_shapes(tensors: dict, cfg: M.ModelConfig, where: str):
    """Every weight the config's model has, of its shape, and no other, read off the file's tensor list."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in M.hf_state(M.Transformer(cfg)).items()}
    if cfg.tie_word_embeddings:
        del expected["lm_head.weight"]
    got = {hf_name(n, where): tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in tensors.items()
           if n != "rope_freqs.weight"}
    if got != expected:
        bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise ConvertError(f"{where}: tensors do not match the metadata's {cfg.architecture}: "
                           + ", ".join(f"{k} {got.get(k)} (expected {expected.get(k)})" for k in bad[:4]))


def weights(tensors: dict, cfg: M.ModelConfig, dtype) -> dict:
    """{Hugging Face name: tensor} of every weight, dequantized to dtype."""
    llama = cfg.architecture == "LlamaForCausalLM"
    out = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue  # read into the config (choice 5)
        w = dequantize(t, torch.float32)
        if llama and ".attn_q." in name:
            w = unpermute(w, cfg.num_attention_heads)
        elif llama and ".attn_k." in name:
            w = unpermute(w, cfg.num_key_value_heads)
        out[hf_name(name, "")] = w.to(dtype).contiguous()
    return out


# ---- tokenizer ----

SPLITS = {  # tokenizer.ggml.pre -> the split pattern its merges were learned with (choice 4)
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+"),
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
PRE_TOKENIZERS = ("smollm", "gpt-2", *SPLITS)


def pre_tokenizer(pre: str):
    if pre in SPLITS:  # the pattern splits, then bytes are mapped to characters
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's pattern
    if pre == "smollm":  # every digit on its own first, as llama.cpp and SmolLM2's own tokenizer.json do
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def build_tokenizer(meta: dict, where: str) -> HFTokenizer:
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ConvertError(f"{where}: tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise ConvertError(f"{where}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens, merges = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.merges", [])
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    assert all(len(p) == 2 for p in pairs), \
        f"{where}: a merge is not two tokens: {next(m for m in merges if m.count(' ') != 1)!r}"
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre == "llama-bpe"))  # Llama-3 takes whole words first
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)
                    for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:  # Llama-3: every text starts with BOS
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           pair=f"{tokens[bos]} $A {tokens[bos]}:1 $B:1",
                                                           special_tokens=[(tokens[bos], bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_files(meta: dict, cfg: M.ModelConfig) -> dict:
    """tokenizer_config.json and generation_config.json."""
    tokens = meta["tokenizer.ggml.tokens"]
    name = lambda key: tokens[meta[key]] if key in meta else None
    eos = cfg.eos_token_id
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("tokenizer.ggml.bos_token_id"),
            "eos_token": name("tokenizer.ggml.eos_token_id"), "pad_token": name("tokenizer.ggml.padding_token_id"),
            "unk_token": name("tokenizer.ggml.unknown_token_id"),
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)), "add_eos_token": False,
            "model_max_length": cfg.max_position_embeddings, "clean_up_tokenization_spaces": False}
    if meta.get("tokenizer.chat_template"):
        tcfg["chat_template"] = meta["tokenizer.chat_template"]
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}
    return {"tokenizer_config.json": {k: v for k, v in tcfg.items() if v is not None},
            "generation_config.json": {k: v for k, v in gen.items() if v is not None}}


# ---- python convert.py FILE.gguf OUT_DIR ----

def convert(file, out, dtype=torch.float32, overwrite=False):
    file, out = Path(file), Path(out)
    if not file.is_file():
        raise ConvertError(f"{file}: no such file")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out}: already exists (--overwrite replaces it)")
    meta, tensors = read_gguf(file)
    where = str(file)
    cfg = model_config(meta, tensors, where)
    bad = sorted({t.tensor_type.name for t in tensors.values()} - set(DEQUANTIZED))
    if bad:
        raise ConvertError(f"{where}: tensor type {', '.join(bad)} is not supported "
                           f"(supported: {', '.join(DEQUANTIZED)})")
    check_shapes(tensors, cfg, where)
    tok = build_tokenizer(meta, where)
    state = weights(tensors, cfg, dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        for name, d in tokenizer_files(meta, cfg).items():
            (tmp / name).write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
        back = load_tokenizer(tmp)  # what train.py will read
        assert back.vocab_size <= cfg.vocab_size, f"{where}: {back.vocab_size} tokens, {cfg.vocab_size} embedding rows"
        M.swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg, back


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert a GGUF file (Llama / Qwen2 / Mistral, byte-level BPE tokenizer) "
                                            "into a Hugging Face folder.")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="the folder to write (must not exist, unless --overwrite)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        import gguf  # noqa: F401  (optional: only this script needs it)
    except ImportError:
        raise SystemExit("error: convert.py reads GGUF files with the gguf package: pip install gguf") from None
    try:
        cfg, tok = convert(args.gguf, args.out, getattr(torch, args.dtype), args.overwrite)
    except (ConvertError, M.CheckpointError, AssertionError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}: {cfg.architecture}, {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
          f"{tok.vocab_size} tokens, chat format {tok.chat_format}, end ids {tok.eos_ids}, {args.dtype}")


if __name__ == "__main__":
    main(sys.argv[1:])
