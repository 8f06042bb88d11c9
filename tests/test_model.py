import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import model as M
from conftest import KINDS, hf_tensors
from tokenizer import build_tokenizer


def tokens_for(m, B, T, seed=0):
    return torch.randint(0, m.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- loading ----

@pytest.mark.parametrize("kind", ["qwen2", "llama", "mistral"])
def test_load_gives_finite_logits_and_the_file_weights(ckpt, kind):
    path = ckpt(kind)
    m = M.load_model(path, device="cpu")
    logits = m(tokens_for(m, 2, 9))
    assert logits.shape == (2, 9, KINDS[kind]["vocab_size"]) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    file = load_file(str(path / "model.safetensors"))
    state = M.hf_state(m)
    for name, t in file.items():
        assert torch.equal(state[name], t), name  # exact: weights copied, not computed
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == KINDS[kind]["tie_word_embeddings"]
    assert all(p.requires_grad for p in m.parameters())


def test_qwen2_has_qkv_bias_and_no_o_bias(ckpt):
    m = M.load_model(ckpt("qwen2"), device="cpu")
    attn = m.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    state = M.hf_state(m)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= set(state)
    assert "model.layers.0.self_attn.o_proj.bias" not in state


def test_stacked_projections_save_and_load_under_hugging_face_names(tmp_path):
    """q, k, v and gate, up are one matrix each inside (model.py choice 5), separate tensors in a saved folder."""
    torch.manual_seed(0)
    m = M.Transformer(M.tiny_config(50, qkv_bias=True, architecture="Qwen2ForCausalLM"))
    # no state-dict hooks: state_dict() holds the parameters under their own names, stacked ones included
    assert list(m.state_dict()) == [n for n, _ in m.named_parameters(remove_duplicate=False)]
    M.save_model(m, tmp_path / "m")
    names = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    for part in ("self_attn.q_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight"):
        assert f"model.layers.3.{part}" in names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    back = M.load_model(tmp_path / "m", device="cpu")
    for (a, x), (b, y) in zip(m.named_parameters(), back.named_parameters()):
        assert a == b and torch.equal(x, y), a
    q = M.hf_state(m)["model.layers.0.self_attn.q_proj.weight"]  # rows 0..H*D-1 of the stacked matrix
    assert torch.equal(q, m.model.layers[0].self_attn.qkv_proj.weight[:q.shape[0]])


def test_sharded_and_v5_style_load_the_same_model(ckpt):
    tok = torch.randint(0, 97, (2, 11))
    ref = M.load_model(ckpt("qwen2"), device="cpu")(tok)
    sharded = ckpt("qwen2", name="sharded", shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    # exact: the same weights and config, so the same forward (same ops, same shapes) run again
    assert torch.equal(M.load_model(sharded, device="cpu")(tok), ref)
    assert torch.equal(M.load_model(ckpt("qwen2", name="v5", v5_style=True), device="cpu")(tok), ref)


def test_llama3_rope_scaling_in_both_config_styles(ckpt):
    hub = M.load_model(ckpt("llama"), device="cpu")
    v5 = M.load_model(ckpt("llama", name="v5", v5_style=True), device="cpu")
    assert hub.config.rope_scaling["rope_type"] == v5.config.rope_scaling["rope_type"] == "llama3"
    assert torch.equal(hub.inv_freq, v5.inv_freq)  # exact: one function of the same numbers, run twice

    # the frequencies as the llama3 recipe states them, branch by branch
    s, D, theta = KINDS["llama"]["rope_scaling"], 16, 500000.0
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    expected, kinds = [], set()
    for i in range(0, D, 2):
        f = 1.0 / theta ** (i / D)
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            expected.append(f); kinds.add("kept")
        elif wavelen > low_wavelen:
            expected.append(f / s["factor"]); kinds.add("stretched")
        else:
            a = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                 / (s["high_freq_factor"] - s["low_freq_factor"]))
            expected.append((1 - a) * f / s["factor"] + a * f); kinds.add("smoothed")
    assert kinds == {"kept", "stretched", "smoothed"}  # the test covers all three bands
    # float32 against this float64 recipe: a few roundings of 6e-8 each (8e-8 measured); rtol 1e-6 is
    # ~10x that, while a wrong band or factor is off by 10 % or more
    torch.testing.assert_close(hub.inv_freq, torch.tensor(expected), rtol=1e-6, atol=0)
    plain = M.rope_inv_freq(M.ModelConfig(**{**hub.config.__dict__, "rope_scaling": None}))
    assert not torch.equal(plain, hub.inv_freq)


# ---- KV cache ----

@pytest.mark.parametrize("kind", ["qwen2", "llama", "mistral"])
def test_cached_decode_equals_full_forward(ckpt, kind):
    m = M.load_model(ckpt(kind), device="cpu")
    tok = tokens_for(m, 3, 20)
    with torch.no_grad():
        full = m(tok)
        cache = m.new_cache(3, 20)
        steps = [m(tok[:, :7], cache=cache)]  # prefill 7 tokens, then one at a time
        steps += [m(tok[:, t:t + 1], cache=cache) for t in range(7, 20)]
    assert cache.length == 20
    # other matmul and attention shapes: float32 sums in another order. Logits |x| < 4 here differ by
    # ~3e-6 at most (a few ulps); 1e-5 is 3x that and far below what a wrong position or mask moves (0.1)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_left_padded_ragged_batch_equals_each_row_alone(ckpt, kind):
    m = M.load_model(ckpt(kind), device="cpu")
    V, pad = m.config.vocab_size, 0
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, V, (n,), generator=g) for n in (5, 12, 1)]
    extra = torch.randint(1, V, (3, 6), generator=g)  # tokens fed after the prompts, one per step
    P = max(len(r) for r in rows)
    tok = torch.full((3, P), pad)
    valid = torch.zeros(3, P, dtype=torch.bool)
    for i, r in enumerate(rows):
        tok[i, P - len(r):], valid[i, P - len(r):] = r, True
    pos = (valid.cumsum(1) - 1).clamp(min=0)  # (B, P): a row's first real token sits at position 0
    lengths = valid.sum(1)
    # below: padded batches against rows alone, cached against not, static against dynamic cache: other
    # shapes, float32 sums in another order, ~2e-6 apart at most on logits |x| < 4; 1e-5 as above
    with torch.no_grad():
        no_cache = m(tok, pos=pos, valid=valid)
        cache = m.new_cache(3, P + 6)
        prefill = m(tok, pos=pos, valid=valid, cache=cache)
        steps = [m(extra[:, t:t + 1], pos=(lengths + t)[:, None], cache=cache) for t in range(6)]
        for i, r in enumerate(rows):
            alone = m(torch.cat([r, extra[i]])[None])[0]  # (len + 6, V)
            n = len(r)
            assert (no_cache[i, P - n:] - alone[:n]).abs().max() <= 1e-5
            assert (prefill[i, P - n:] - alone[:n]).abs().max() <= 1e-5
            assert (torch.cat([s[i] for s in steps]) - alone[n:]).abs().max() <= 1e-5
    assert torch.isfinite(prefill).all()  # padded queries stay finite too

    cache = m.new_cache(3, P + 9)  # a static cache: attention over all 9 + P slots at every step
    m(tok, pos=pos, valid=valid, cache=cache)
    cache.go_static()
    with torch.no_grad():
        static = [m(extra[:, t:t + 1], pos=(lengths + t)[:, None], cache=cache) for t in range(6)]
    assert int(cache.slot) == P + 6 and cache.k.shape[3] == P + 9
    for a, b in zip(static, steps):
        assert (a - b).abs().max() <= 1e-5


def test_last_only_and_cache_overflow(ckpt):
    m = M.load_model(ckpt("mistral"), device="cpu")
    tok = tokens_for(m, 2, 6)
    with torch.no_grad():
        # the head on 1 position against on all 6: other matmul shapes, float32 sums in another order,
        # ~5e-7 apart on logits |x| < 2 (a few ulps); atol 1e-5 is 20x that and far below a logit gap
        # that matters, while the wrong position's logits differ by ~1
        torch.testing.assert_close(m(tok, last_only=True), m(tok)[:, -1:], atol=1e-5, rtol=0)
        keep = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)  # the same, at chosen positions
        torch.testing.assert_close(m(tok, keep=keep), m(tok)[keep], atol=1e-5, rtol=0)
        cache = m.new_cache(2, 6)
        m(tok, cache=cache)
        with pytest.raises(AssertionError, match="cache full"):
            m(tok[:, :1], cache=cache)
    with pytest.raises(AssertionError, match="context"):
        m.new_cache(1, m.config.max_seq_len + 1)


# ---- saving ----

def test_save_then_load_is_exact(ckpt, tmp_path):
    for kind in ("qwen2", "llama", "mistral"):
        m = M.load_model(ckpt(kind), device="cpu")
        out = tmp_path / f"saved_{kind}"
        tokenizer = build_tokenizer(["Stock", ":", "A", "=", "3"])
        M.save_model(m, out, tokenizer=tokenizer)
        back = M.load_model(out, device="cpu")
        a, b = m.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact: a round trip
        # the saved config is the loaded one, with the tokenizer's end and padding ids
        assert back.config == dataclasses.replace(m.config, eos_token_id=tokenizer.eos_ids[0],
                                                  pad_token_id=tokenizer.pad_id)
        tok = tokens_for(m, 2, 8)
        assert torch.equal(back(tok), m(tok))  # exact: the same weights, the same forward run twice
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == KINDS[kind]["architectures"] and cfg["model_type"] == KINDS[kind]["model_type"]
        assert ("lm_head.weight" in load_file(str(out / "model.safetensors"))) == (
            not KINDS[kind]["tie_word_embeddings"])
        assert (out / "tokenizer.json").is_file()


def test_save_bfloat16_round_trip(ckpt, tmp_path):
    m = M.load_model(ckpt("llama"), device="cpu", dtype=torch.bfloat16)
    M.save_model(m, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = M.load_model(tmp_path / "bf16", device="cpu", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) and b.dtype == torch.bfloat16  # exact: a round trip
               for a, b in zip(m.state_dict().values(), back.state_dict().values()))


def test_save_is_atomic(ckpt, tmp_path, monkeypatch):
    m = M.load_model(ckpt("qwen2"), device="cpu")
    out = tmp_path / "run"
    M.save_model(m, out)
    before = (out / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(M, "save_file", crash)
    with torch.no_grad():
        m.model.norm.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        M.save_model(m, out)
    assert (out / "model.safetensors").read_bytes() == before  # the old checkpoint is intact
    with pytest.raises(RuntimeError):
        M.save_model(m, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2", "run"]  # nothing half-written


def test_tied_head_shares_one_gradient(ckpt):
    m = M.load_model(ckpt("llama"), device="cpu")
    m(tokens_for(m, 1, 5)).sum().backward()
    assert m.lm_head.weight is m.model.embed_tokens.weight and m.lm_head.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients(ckpt):
    m = M.load_model(ckpt("qwen2"), device="cpu")
    tok = tokens_for(m, 2, 9)
    grads = []
    for on in (False, True):
        m.grad_checkpointing = on
        m.zero_grad()
        m(tok).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    # each block's forward recomputed inside the backward: another autograd graph, so equal only up to
    # float32 rounding of the gradient sums (identical as measured); on gradients up to 0.2, rtol 1e-5
    # and atol 1e-6 are ~100x float32's 1.2e-7, far below a missed or doubled term
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(*grads))


# ---- bad input: one clear error naming the file and the key ----

def test_bad_checkpoints(ckpt, tmp_path):
    def err(path):
        with pytest.raises(M.CheckpointError) as e:
            M.load_model(path, device="cpu")
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "no config.json" in err(tmp_path)

    t = hf_tensors(KINDS["qwen2"])
    del t["model.layers.1.mlp.up_proj.weight"]
    assert "missing ['model.layers.1.mlp.up_proj.weight']" in err(ckpt("qwen2", name="missing", tensors=t))

    t = {**hf_tensors(KINDS["qwen2"]), "model.layers.0.extra.weight": torch.zeros(2)}
    assert "unexpected ['model.layers.0.extra.weight']" in err(ckpt("qwen2", name="extra", tensors=t))

    t = hf_tensors(KINDS["qwen2"])
    t["model.norm.weight"] = torch.ones(63)
    msg = err(ckpt("qwen2", name="shape", tensors=t))
    assert "model.norm.weight" in msg and "[63]" in msg and "[64]" in msg and "model.safetensors" in msg

    msg = err(ckpt("qwen2", name="arch", architectures=["GPT2LMHeadModel"]))
    assert "config.json" in msg and "GPT2LMHeadModel" in msg and "Qwen2ForCausalLM" in msg

    msg = err(ckpt("llama", name="yarn", rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    assert "yarn" in msg and "config.json" in msg

    msg = err(ckpt("qwen2", name="nokey", tensors=hf_tensors(KINDS["qwen2"]), hidden_size=None))
    assert "'hidden_size'" in msg

    bad = ckpt("qwen2", name="json")
    (bad / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"],\n "vocab_size": }')
    assert "invalid JSON at line 2" in err(bad)

    trunc = ckpt("qwen2", name="truncated")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors: not a readable safetensors file" in err(trunc)

    noweights = ckpt("qwen2", name="noweights")
    (noweights / "model.safetensors").unlink()
    assert "no model.safetensors" in err(noweights)
