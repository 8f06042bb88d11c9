"""Parity with the transformers library, run only where transformers is installed (it is not a
dependency: `pip install transformers` to run these). Random-weight checkpoints written by
transformers' own save_pretrained, in its config style and in the hub style."""

import json

import pytest
import torch

import model as M
from conftest import same_or_near_tie

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
CASES = {
    "qwen2": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "llama": ("Llama", dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=5e5, rope_scaling=LLAMA3)),
    "llama_tied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True, head_dim=32)),
    "mistral": ("Mistral", dict(num_key_value_heads=2, sliding_window=None, head_dim=32)),
}


def hub_style(path):
    """Rewrite a transformers-5 config.json the way hub checkpoints keep it: rope at the top level."""
    c = json.loads((path / "config.json").read_text())
    rope = c.pop("rope_parameters", None)
    if rope is None:
        return
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    (path / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("style", ["transformers", "hub"])
def test_logits_match_transformers(tmp_path, case, style):
    family, kw = CASES[case]
    config = getattr(transformers, f"{family}Config")(**SMALL, **kw)
    torch.manual_seed(0)
    hf = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # norms and biases away from their init, so that a mix-up shows
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    if style == "hub":
        hub_style(tmp_path / "hf")
    tok = torch.randint(0, 300, (2, 300))
    with torch.no_grad():
        ref = hf(tok).logits
        ours = M.load_model(tmp_path / "hf", device="cpu")
        # another implementation: transformers may order the float32 sums otherwise (its attention kernels
        # and op order vary with its version and the CPU). Rounding on logits |x| < 1.5 is ~1e-6 (identical
        # with transformers 5.24 as measured); 1e-4 leaves 100x for other versions, while a wrong rope,
        # norm or head layout moves the logits by 1e-2 or more
        assert (ours(tok) - ref).abs().max() <= 1e-4
        M.save_model(ours, tmp_path / "ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert type(back).__name__ == f"{family}ForCausalLM"
        # transformers both times, on our saved config: 1e-4 as above
        assert (back(tok).logits - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["qwen2", "llama"])
def test_greedy_tokens_match_transformers_generate(tmp_path, case):
    from rollout import generate

    family, kw = CASES[case]
    torch.manual_seed(1)
    hf = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**SMALL, **kw)).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(3)  # clear winners for greedy
    hf.save_pretrained(tmp_path / "hf")
    ours = M.load_model(tmp_path / "hf", device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (4, 19, 9, 1)]
    pad, eos, P = 0, 7, 19
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                      pad_token_id=pad, eos_token_id=eos)[:, P:].tolist()
    # two implementations' greedy tokens: the logits agree to 1e-4 (test_logits_match_transformers) and our
    # sampler to 1e-5 with a full forward, so the same tokens, or a first difference where the best two are
    # within 2e-4 under our full forward, either being right (the best two are 4e-3 or more apart here)
    samples = generate(ours, prompts, max_new_tokens=24, temperature=0, eos_ids=[eos], pad_id=pad)
    assert len(samples) == len(ref)
    for s, r in zip(samples, ref):
        n = r.index(eos) + 1 if eos in r else len(r)  # transformers' reply, then padding
        if same_or_near_tie(ours, prompts[s.prompt_index], s.tokens, r[:n], 2e-4) == len(s.tokens):
            assert all(t == pad for t in r[n:])
