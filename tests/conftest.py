"""Tiny Hugging Face style checkpoints, written by hand (not by model.save_model), for the tests."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = {
    # Qwen2: qkv bias, tied embeddings, plain RoPE
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=97, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=256, tie_word_embeddings=True,
                  use_sliding_window=False, sliding_window=4096, eos_token_id=3),
    # Llama: GQA 4:1, tied, llama3 rope scaling, explicit head_dim
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=101, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=256,
                  tie_word_embeddings=True, attention_bias=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=64)),
    # Mistral: untied head, no sliding window
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=90, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
                    sliding_window=None),
}


def hf_tensors(c: dict, seed=0) -> dict:
    """Random weights under Hugging Face's parameter names for config dict c."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    C, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    D = c.get("head_dim") or C // c["num_attention_heads"]
    H, Hkv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    qwen = c["model_type"] == "qwen2"
    t = {"model.embed_tokens.weight": r(V, C), "model.norm.weight": 1 + r(C)}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = r(V, C)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + r(C), p + "post_attention_layernorm.weight": 1 + r(C),
                  p + "self_attn.q_proj.weight": r(H, C), p + "self_attn.k_proj.weight": r(Hkv, C),
                  p + "self_attn.v_proj.weight": r(Hkv, C), p + "self_attn.o_proj.weight": r(C, H),
                  p + "mlp.gate_proj.weight": r(I, C), p + "mlp.up_proj.weight": r(I, C),
                  p + "mlp.down_proj.weight": r(C, I)})
        if qwen:
            t.update({p + "self_attn.q_proj.bias": r(H), p + "self_attn.k_proj.bias": r(Hkv),
                      p + "self_attn.v_proj.bias": r(Hkv)})
    return t


def write_checkpoint(path, kind="qwen2", shards=1, v5_style=False, tensors=None, **overrides):
    """Write config.json + safetensors (one file, or `shards` files with an index) into path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = {**KINDS[kind], **overrides}
    t = hf_tensors(c) if tensors is None else tensors
    if v5_style:  # transformers 5 keeps rope settings under rope_parameters
        rope = dict(c.pop("rope_scaling", None) or {"rope_type": "default"})
        c["rope_parameters"] = {**rope, "rope_theta": c.pop("rope_theta")}
    (path / "config.json").write_text(json.dumps(c))
    if shards == 1:
        save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(t)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: t[n] for n in names[s::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def ckpt(tmp_path):
    return lambda kind="qwen2", name=None, **kw: write_checkpoint(tmp_path / (name or kind), kind, **kw)


def same_or_near_tie(m, prompt, got, want, tol, temperature=0.0, noise=None):
    """got, want: the tokens two DIFFERENT computations (batched or alone, cached or recomputed, compiled
    or eager, this code or transformers) chose for one prompt. Their logits agree only to float32
    rounding, so where the two best choices are within that rounding either may win: exact equality
    could fail on another CPU or thread count without any bug. So: the same tokens, or the same up to a
    first difference that is a near-tie, both tokens within tol of the best under a plain full forward
    of m over prompt + the common prefix (after it the two continue from different inputs and are not
    compared). What is maximised: the logits (greedy), else log_softmax(logits / T) - log q, q =
    noise(step) the row's Exp(1) noise, the same in both runs (the exponential race, rollout.py choice 1).
    tol: the most the two computations' scores can differ (each one's distance to the reference, summed).
    Returns the length of the common prefix: the tokens whose log-probs can be compared."""
    for k, (a, b) in enumerate(zip(got, want)):
        if a != b:
            with torch.no_grad():
                score = m(torch.tensor([prompt + want[:k]]))[0, -1].float()
            if temperature:
                score = torch.log_softmax(score / temperature, dim=-1) - noise(k).log()
            gap = (score.max() - score[[a, b]]).max().item()
            assert gap <= tol, f"token {k}: {a} against {b}, {gap:.1e} below the best: not a near-tie"
            return k
    assert len(got) == len(want), (got, want)
    return len(got)
