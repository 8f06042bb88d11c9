"""Parity with the transformers library, run only where transformers is installed (it is not a
dependency: `pip install transformers` to run these). Random-weight checkpoints written by
transformers' own save_pretrained, in its config style and in the hub style."""

import json

import pytest
import torch

import model as M

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
        assert (ours(tok) - ref).abs().max() <= 1e-4
        M.save_model(ours, tmp_path / "ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert type(back).__name__ == f"{family}ForCausalLM"
        assert (back(tok).logits - ref).abs().max() <= 1e-4
