"""A hand-written decoder of the Llama / Qwen2 / Mistral family, its KV cache, and Hugging Face I/O.

One file, read top to bottom: config -> layers -> model -> KV cache -> loading and saving checkpoints
-> the tiny default model and the benchmark shapes -> peak memory. Module names equal Hugging Face's
parameter names (`model.layers.0.self_attn.o_proj.weight`, ...) but for the stacked projections (choice 5),
so a checkpoint loads without a mapping table and what we save opens in `transformers`. The tokenizer is
tokenizer.py; the decoder's benchmark is `python bench.py decoder`.

Choices that are ours (the paper says nothing about the network itself):
1. Rows of different lengths are LEFT-padded. The caller gives per-row RoPE positions and a `valid`
   mask (False on padding); the attention mask is built from those and from cache slots, never with
   `is_causal=True` when queries and keys differ in length. A padded query attends to itself only,
   so its (unused) output stays finite.
2. The KV cache is preallocated, layout `(layers, B, H_kv, T_max, D)`; every row writes the same slot
   index at each step, which is what left padding allows.
3. Sliding-window attention is not implemented: a Mistral / Qwen2 checkpoint that uses a window is
   loaded with its context capped at the window, where full attention and windowed attention agree.
4. The tiny default model (under a million parameters) and a word-level tokenizer (tokenizer.py) serve
   the embedded domain; they go through the same save / load path as a real checkpoint.
5. Projections that read the same input are stacked into one matrix: q, k and v (`qkv_proj`), gate and
   up (`gate_up_proj`): one matrix product instead of three and two, fewer operators in a step where a
   small model pays per operator (RESULTS.md, "The CPU step, profiled and made faster"). state_dict()
   holds the stacked matrices, as named_parameters() does (no state-dict hooks); a checkpoint keeps
   Hugging Face's separate names: load_model stacks the parts as it reads them (stack_state), save_model
   splits the matrices before it writes (hf_state, split_state), so checkpoints and saved folders are
   unchanged. Each part is initialised as the separate matrix was.
"""

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A bad checkpoint folder or file; the message is one line naming the file and the key."""


# ---- config ----

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")
SDPA_GQA = torch.__version__ >= "2.5"  # scaled_dot_product_attention(enable_gqa=True) exists


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always; Llama: attention_bias
    o_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj; Qwen2's o_proj has none
    mlp_bias: bool = False
    sliding_window: int | None = None  # only kept so that a saved config says what the source said
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, \
            f"{self.num_attention_heads} heads not divisible by {self.num_key_value_heads} kv heads"

    @property
    def max_seq_len(self):
        """Longest sequence we run: the model's context, capped at a sliding window (choice 3)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face config.json dict; hub style (top-level rope_theta / rope_scaling) or
        transformers-5 style (`rope_parameters`)."""
        arch = (d.get("architectures") or [None])[0]
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{where}: architecture {arch!r} is not supported "
                                  f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int):
                raise CheckpointError(f"{where}: key {key!r} is missing or not an integer")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported "
                                  f"(supported: {', '.join(ROPE_TYPES)})")
        rope = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        window = d.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not d.get("use_sliding_window", False):
            window = None  # Qwen2 keeps a sliding_window value that it does not use unless told to
        bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta), rope_scaling=rope,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bias, o_bias=arch == "LlamaForCausalLM" and bias,
            mlp_bias=bool(d.get("mlp_bias", False)), sliding_window=window, architecture=arch,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))

    def to_hf(self, dtype: torch.dtype) -> dict:
        """The config.json dict, hub style, which transformers 4 and 5 both read."""
        model_type = ARCHITECTURES[self.architecture]
        d = dict(architectures=[self.architecture], model_type=model_type, hidden_act="silu",
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                 rope_scaling=self.rope_scaling, max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, sliding_window=self.sliding_window,
                 bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                 pad_token_id=self.pad_token_id, torch_dtype=str(dtype).removeprefix("torch."))
        if model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if model_type == "qwen2":
            d.update(use_sliding_window=self.sliding_window is not None)
        return d


# ---- layers ----

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE, (D/2,) float32, with `linear` or `llama3` scaling applied."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: wavelengths longer than old_len / low_freq_factor are stretched by `factor`, shorter than
    # old_len / high_freq_factor kept, and those between interpolated smoothly.
    factor, low, high, old_len = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                  s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)  # 0: stretched, 1: kept
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_tables(pos, inv_freq, dtype):
    """cos and sin of RoPE's angles at positions pos (B, T): cos (B, 1, T, D) and the sin that apply_rope
    takes, its first half negated (B, 1, T, D). Angles are computed in fp32."""
    freqs = pos[..., None].float() * inv_freq  # (B, T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1)[:, None].to(dtype), torch.cat((-sin, sin), dim=-1)[:, None].to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, D) rotated by RoPE in Hugging Face's layout: x * cos + (-x2, x1) * sin, x1 and x2 the two
    halves of D. Written as x * cos + (x2, x1) * (-sin, sin): the halves swapped by a flip, the sign kept in
    the table (rope_tables), one operation fewer; the same numbers."""
    return x * cos + x.unflatten(-1, (2, -1)).flip(-2).flatten(-2) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x * rsqrt(mean(x^2) + eps) in fp32, then cast back and scaled, as transformers does
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Stacked(nn.Linear):
    """One nn.Linear whose output rows stack several Hugging Face projections of the same input (choice 5):
    `parts` maps each part's name to its number of rows, in order."""

    def __init__(self, in_features, parts: dict, bias):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, D = cfg.hidden_size, cfg.head_dim
        self.qkv_proj = Stacked(C, {"q_proj": self.n_head * D, "k_proj": self.n_kv * D, "v_proj": self.n_kv * D},
                                bias=cfg.qkv_bias)  # choice 5
        self.o_proj = nn.Linear(self.n_head * D, C, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        H, H_kv = self.n_head, self.n_kv
        qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, self.head_dim).transpose(1, 2)  # (B, H + 2 H_kv, T, D)
        qk = apply_rope(qkv[:, :H + H_kv], cos, sin)  # (B, H + H_kv, T, D): q and k rotated together
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + H_kv:]  # (B, H, T, D), (B, H_kv, T, D), (B, H_kv, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, S, D), S = slots used so far
        # grouped-query attention: each kv head serves n_head / n_kv query heads. Decoding one token
        # lets SDPA share the heads (enable_gqa); copying the whole cache per step would cost more than
        # the attention itself. So does plain causal attention on a CPU (training: 10-25 % less time
        # than repeated heads, forward and backward). Elsewhere the heads are repeated, which every
        # SDPA kernel accepts (CUDA's kernels for an explicit mask do not share heads).
        gqa = H_kv != H
        if gqa and not (SDPA_GQA and (T == 1 or (mask is None and x.device.type == "cpu"))):
            k = k.repeat_interleave(H // H_kv, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(H // H_kv, dim=1)  # (B, H, S, D)
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           **({"enable_gqa": True} if gqa else {}))  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        I = cfg.intermediate_size
        self.gate_up_proj = Stacked(cfg.hidden_size, {"gate_proj": I, "up_proj": I}, bias=cfg.mlp_bias)  # choice 5
        self.down_proj = nn.Linear(I, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---- model ----

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.grad_checkpointing = False  # True: keep only each block's input, recompute the block in the backward
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # Hugging Face's initializer_range 0.02; only matters when training from scratch
        if isinstance(m, (nn.Linear, nn.Embedding)):
            for w in m.weight.split(list(m.parts.values())) if isinstance(m, Stacked) else [m.weight]:
                nn.init.normal_(w, std=0.02)  # a stacked matrix part by part, in order: the draws of separate ones
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens, pos=None, valid=None, cache=None, last_only=False, keep=None):
        """tokens (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with last_only, or (K, vocab) with keep.

        pos (B, T): RoPE positions; default 0..T-1, continuing from the cache when there is one.
        valid (B, T) bool: False on padding tokens, which no other token attends to; default all True.
        cache: a KVCache; the T tokens fill its next T slots. Without cache and valid, plain causal.
        keep (B, T) bool: return the logits of these K positions only, in row-major order (training needs
        those of the response tokens; the rest would be computed for nothing).
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if pos is None:
            assert cache is None or cache.slot is None, "a static cache needs explicit positions"
            pos = torch.arange(start, start + T, device=tokens.device).expand(B, T)
            assert start + T <= self.config.max_seq_len, f"{start} + {T} tokens > context {self.config.max_seq_len}"
        x = self.model.embed_tokens(tokens)  # (B, T, C)
        cos, sin = rope_tables(pos, self.inv_freq, x.dtype)  # (B, 1, T, D) each

        mask = None  # None: plain causal (is_causal=True), only when queries and keys are the same T tokens
        if cache is not None or valid is not None:
            if valid is None:
                valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
            if cache is not None:
                key_valid = cache.mark(valid)  # (B, S): slots 0..start+T-1
            else:
                key_valid = valid
            S = key_valid.shape[1]
            q_slot = (cache.slots(T) if cache is not None else torch.arange(T, device=tokens.device))[:, None]  # (T, 1)
            k_slot = torch.arange(S, device=tokens.device)[None, :]  # (1, S)
            mask = (k_slot <= q_slot) & key_valid[:, None, :]  # (B, T, S): causal over slots, no padding
            mask = (mask | (k_slot == q_slot))[:, None]  # (B, 1, T, S): a padded query sees itself

        for i, block in enumerate(self.model.layers):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        if keep is not None:
            x = x[keep]  # (K, C)
        return self.lm_head(self.model.norm(x))

    def new_cache(self, batch_size, max_len):
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)


# ---- KV cache ----

class KVCache:
    """Preallocated keys and values.

    k, v: (layers, B, H_kv, T_max, D). Slot s of every row holds the token that row fed at step s (rows
    are left-padded, so all rows fill the same slots). valid: (B, T_max), False for padding slots.
    length: slots filled so far. Positions live with the caller; the cache only stores slots.

    After go_static() the next slot is a tensor (`slot`) and attention runs over all T_max slots
    (the unfilled ones masked): every decode step then has the same shapes and no host-side state,
    which is what torch.compile and CUDA graphs need (rollout.py --compile).
    """

    def __init__(self, cfg: ModelConfig, batch_size, max_len, device, dtype):
        assert max_len <= cfg.max_seq_len, f"cache length {max_len} > context {cfg.max_seq_len}"
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.slot = None  # a 0-dim tensor once static

    def go_static(self):
        self.slot = torch.tensor(self.length, device=self.k.device)

    def slots(self, T):
        """The slots the next T tokens fill: (T,) tensor."""
        start = self.slot if self.slot is not None else self.length
        return start + torch.arange(T, device=self.k.device)

    def mark(self, valid):
        """Record which of the next T slots hold real tokens; return valid for slots 0..length+T-1
        (static: all slots)."""
        T = valid.shape[1]
        if self.slot is not None:
            self.valid.index_copy_(1, self.slots(T), valid)
            return self.valid
        assert self.length + T <= self.k.shape[3], f"cache full: {self.length} + {T} > {self.k.shape[3]}"
        self.valid[:, self.length:self.length + T] = valid
        return self.valid[:, :self.length + T]

    def advance(self, T):
        if self.slot is not None:
            self.slot += T  # in place: a CUDA graph's replay advances it too
        else:
            self.length += T

    def prefix(self, rows) -> "KVCache":
        """A cache over the first `rows` rows that shares this one's memory (prefill once, see tile_from)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.valid, view.length, view.slot = (self.k[:, :rows], self.v[:, :rows], self.valid[:rows],
                                                              self.length, None)
        return view

    def tile_from(self, prefix: "KVCache"):
        """Copy the prefilled rows of `prefix` to all rows: row r takes row r % rows. This is how the n
        samples of a prompt share one prefill."""
        rows, S = prefix.k.shape[1], prefix.length
        assert self.k.shape[1] % rows == 0, f"{self.k.shape[1]} rows is not a multiple of {rows}"
        for r in range(rows, self.k.shape[1], rows):
            self.k[:, r:r + rows, :, :S] = prefix.k[:, :, :, :S]
            self.v[:, r:r + rows, :, :S] = prefix.v[:, :, :, :S]
            self.valid[r:r + rows, :S] = prefix.valid[:, :S]
        self.length = S

    def keep_rows(self, rows):
        """Keep only these rows (R,) of the batch, in this order (the sampler drops finished rows)."""
        self.k, self.v, self.valid = self.k[:, rows], self.v[:, rows], self.valid[rows]

    def update(self, layer, k, v):
        """Write k, v (B, H_kv, T, D) at the next T slots; return all filled slots (B, H_kv, S, D)
        (static: all T_max slots)."""
        B, H, T, D = k.shape
        assert (B, H, D) == (self.k.shape[1], self.k.shape[2], self.k.shape[4]), f"{k.shape} vs cache {self.k.shape}"
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slots(T), k)
            self.v[layer].index_copy_(2, self.slots(T), v)
            return self.k[layer], self.v[layer]
        end = self.length + T
        keys, values = self.k[layer], self.v[layer]  # (B, H_kv, T_max, D) each
        keys.narrow(2, self.length, T).copy_(k)
        values.narrow(2, self.length, T).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)


# ---- loading and saving ----

def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: key 'weight_map' is missing")
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    hint = (" (pytorch_model.bin is not supported: convert it to safetensors)" if (path / "pytorch_model.bin").exists()
            else "")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def stacked(model: nn.Module):
    """(prefix, name, parts) of each Stacked module of model: where its state dict holds a stacked matrix."""
    for name, module in model.named_modules():
        if isinstance(module, Stacked):
            parent, _, child = name.rpartition(".")
            yield parent + ".", child, module.parts


def hf_state(model: nn.Module, state: dict | None = None) -> dict:
    """A state dict of model (default: model.state_dict()) under Hugging Face's names, in place: each stacked
    matrix split into its parts (choice 5). What save_model writes; load_model expects the same names."""
    state = model.state_dict() if state is None else state
    for prefix, name, parts in stacked(model):
        split_state(state, prefix, name, parts)
    return state


def split_state(state: dict, prefix: str, name: str, parts: dict):
    """state[prefix + name + '.weight'] (and '.bias') -> one tensor per part, under prefix + part + '.weight'."""
    for kind in ("weight", "bias"):
        if prefix + f"{name}.{kind}" in state:
            pieces = state.pop(prefix + f"{name}.{kind}").split(list(parts.values()))
            # clone: safetensors refuses shared memory
            state.update({prefix + f"{part}.{kind}": p.clone() for part, p in zip(parts, pieces)})


def stack_state(state: dict, prefix: str, name: str, parts: dict):
    """The reverse of split_state, in place: the parts are dropped as soon as they are stacked. A state that
    lacks a part is left as it is (load_state_dict then names the missing key)."""
    for kind in ("weight", "bias"):
        keys = [prefix + f"{part}.{kind}" for part in parts]
        if all(k in state for k in keys):
            state[prefix + f"{name}.{kind}"] = torch.cat([state.pop(k) for k in keys])


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path, device=None, dtype=None) -> Transformer:
    """Load a Hugging Face folder (config.json + safetensors, sharded or not). float32 on CPU and
    bfloat16 on CUDA by default. The model is built on the meta device and takes the loaded tensors
    as they are, so peak memory is about one copy of the weights."""
    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model folder)")
    cfg = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in hf_state(model).items()}
    if cfg.tie_word_embeddings:
        del expected["lm_head.weight"]

    # pass 1: names and shapes from the headers only
    where, unexpected = {}, []
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        continue  # recomputed / tied: present in some checkpoints, never needed
                    if name not in expected:
                        unexpected.append(name)
                        continue
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[name]):
                        raise CheckpointError(f"{file}: tensor {name} has shape {list(shape)}, "
                                              f"the config expects {list(expected[name])}")
                    where[name] = file
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for a truncated or garbled file
            raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    missing = sorted(set(expected) - set(where))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match {cfg.architecture}: missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}")

    # pass 2: the tensors, straight onto the device, cast one at a time
    state = {}
    for file in sorted(set(where.values())):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                if where.get(name) == file:
                    state[name] = f.get_tensor(name).to(dtype)
    for prefix, name, parts in stacked(model):  # stacked here, so that each part is freed once stacked (choice 5)
        stack_state(state, prefix, name, parts)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # one Parameter, one gradient
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def save_model(model: Transformer, path, tokenizer=None, extra=None):
    """Write a folder that transformers can load: config.json, model.safetensors (Hugging Face names),
    and the tokenizer's files when given. Written to a temporary folder, then renamed into place;
    extra(folder), when given, writes more files (a trainer's state) into the temporary folder."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        cfg = model.config
        state = hf_state(model, {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()})
        if cfg.tie_word_embeddings:
            del state["lm_head.weight"]
        dtype = model.lm_head.weight.dtype
        hf = cfg.to_hf(dtype)
        if tokenizer is not None:
            tokenizer.save(tmp)
            hf.update(eos_token_id=tokenizer.eos_ids[0] if len(tokenizer.eos_ids) == 1 else tokenizer.eos_ids,
                      pad_token_id=tokenizer.pad_id)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: Path, path: Path):
    """Rename a finished temporary folder (named .tmp-...) over `path`: the old folder is moved aside first
    and removed last, so `path` is at every moment either the old folder or the new one."""
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))  # unique, like tmp
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# ---- the tiny default model ----

TINY_VOCAB = 256  # about the embedded domain's vocabulary (domain.tokenizer()); for benchmarks


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    """The default student for the embedded domain: ~0.8M parameters, Llama layout, GQA, tied embeddings:
    width 128, 8 heads of 16 (4 key-value heads), 4 layers. Width 128 rather than the earlier 192 (1.7M): a
    step in two thirds of the time, and the distillation reaches its plateau within the steps it can afford
    (RESULTS.md, "Routes that carry a rule the start lacks")."""
    kw = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
              tie_word_embeddings=True, rms_norm_eps=1e-5)
    return ModelConfig(**{**kw, **overrides})


def qwen25_05b_config() -> ModelConfig:
    """The shape of Qwen2.5-0.5B (random weights, for benchmarks)."""
    return ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=32768, tie_word_embeddings=True, qkv_bias=True,
                       architecture="Qwen2ForCausalLM")


def qwen25_15b_config() -> ModelConfig:
    """The shape of Qwen2.5-1.5B (random weights, for benchmarks)."""
    return ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=32768, tie_word_embeddings=True, qkv_bias=True,
                       architecture="Qwen2ForCausalLM")


# ---- peak memory ----

def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(hwm.group(1)) / 2**20
    except (OSError, AttributeError):
        return float("nan")
