"""Batched sampling with a KV cache: the part of RL that takes most of the time.

    samples = generate(model, prompts, n=4, max_new_tokens=64, temperature=1.0, eos_ids=tok.eos_ids, seed=0)

Prompts of different lengths share one batch, left-padded (see model.py); the n samples of a prompt
share one prefill, copied into n cache rows; each row stops on any end token and is not touched
afterwards. Every sample carries the log-prob of each token it chose, under softmax(logits / T) with
T = temperature (T = 1 when greedy), taken BEFORE top-k / top-p truncation: the same quantity that
the training forward computes with log_softmax(logits / T), so PPO's ratio starts at exactly 1.

Choices that are ours:
1. Sampling uses the exponential race (argmax of p / q, q ~ Exp(1)), which draws from p with one
   random tensor per step and no host sync; the same seed gives the same tokens.
2. Row j * B + i of the batch is sample j of prompt i (sample-major), so generate(prompts, n) samples
   exactly what generate(prompts * n, n=1) samples; the result is returned prompt-major.
   seed may also be a list, one seed per prompt: each prompt's random draws then come from its own
   generator, so its samples do not depend on which other prompts share the batch (what lets a
   torchrun rank sample its share of a step's prompts exactly as one process samples them all).
3. A finished row stays in the batch (fed padding, its outputs ignored) until a quarter of the batch has
   finished; then the finished rows leave it (their cache rows dropped, KVCache.keep_rows), so a batch
   whose answers end early stops paying for them. The random draws are still made for every row, so a
   row's tokens do not depend on when others leave. Not with compile=True (its shapes are fixed).
4. Eager decoding on CUDA keeps SDPA off its cuDNN kernel, which builds a new plan whenever the cache
   length changes, on the CPU, with the GPU idle; flash / memory-efficient / math kernels have no such cost
   (RESULTS.md, "One GPU: rollout, training, one RL step and memory on an H200"; not yet timed on a GPU).
5. compile=True (off by default) decodes with a static cache (model.KVCache.go_static: attention over
   all preallocated slots, the unfilled ones masked) through torch.compile, and on CUDA replays that
   step as one CUDA graph, as gpt-fast does: the step's ~15 kernels per layer are launched as one.
   The first call compiles (seconds to a minute) for any batch and cache size; the graph is
   captured once per call of generate.
6. `greedy` (evaluation) runs many prompts sorted by length, 64 at a time on a CPU (512 on CUDA): a
   batch lasts as long as its longest answer, so small batches of similar prompts stop sooner (the
   batch sizes timed on the embedded domain's test prompts: RESULTS.md).
"""

import argparse
import contextlib
import functools
import time
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import model as M
from tokenizer import load_tokenizer


@dataclass
class Sample:
    prompt_index: int
    tokens: list[int]  # the new tokens, the end token included when there is one
    logprobs: list[float]  # log-prob of each new token under softmax(logits / T), before top-k / top-p
    stopped: bool  # True: ended on an end token; False: ran into max_new_tokens


def left_pad(prompts, pad_id, device):
    """Prompts -> tokens (B, P) left-padded, valid (B, P) bool, positions (B, P) from 0 at each row's start."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p):] = True
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    return tokens.to(device), valid.to(device), pos.to(device)


def race_noise(shape, generators, device):
    """Exp(1) noise (N, V): one generator for all rows, or one per prompt (rows sample-major, choice 2)."""
    if len(generators) == 1:
        return torch.empty(shape, device=device).exponential_(1.0, generator=generators[0])
    B = len(generators)
    q = torch.stack([torch.empty(shape[0] // B, shape[1], device=device).exponential_(1.0, generator=g)
                     for g in generators], dim=1)  # (n, B, V): sample j of prompt i at [j, i]
    return q.view(shape)


def sample(logits, temperature, top_k, top_p, generators, rows=None, n_rows=None):
    """logits (N, V) float32 -> tokens (N,), their log-probs (N,) under softmax(logits / T) (T = 1 if greedy).
    rows (N,): which of the batch's n_rows rows these are, once finished rows have left it (choice 3): the
    noise is drawn for all n_rows rows and these rows' taken."""
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)  # (N, V)
    if temperature == 0:
        tokens = logp.argmax(-1)
    else:
        masked = logp
        if top_k:
            kth = torch.topk(masked, min(top_k, masked.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
            masked = masked.masked_fill(masked < kth, float("-inf"))
        if top_p < 1.0:
            sorted_lp, idx = masked.sort(dim=-1, descending=True)
            p = sorted_lp.softmax(-1)
            drop = p.cumsum(-1) - p > top_p  # tokens after the smallest prefix holding top_p of the mass
            masked = masked.scatter(-1, idx, sorted_lp.masked_fill(drop, float("-inf")))
        probs = masked.softmax(-1)  # (N, V), renormalised after truncation
        q = race_noise(probs.shape, generators, probs.device) if rows is None else \
            race_noise((n_rows, probs.shape[1]), generators, probs.device)[rows]
        tokens = (probs / q).argmax(-1)  # a draw from probs (choice 1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def check_prompts(model, prompts, max_new_tokens):
    ctx, V = model.config.max_seq_len, model.config.vocab_size
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > ctx:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens {max_new_tokens} that is "
                             f"{len(p) + max_new_tokens} > the model's context of {ctx}")
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"prompt {i} has a token id outside [0, {V})")


NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode(model, cache, tokens, pos):
    """One decode step: tokens, pos (N, 1) -> next-token logits (N, V) float32."""
    return model(tokens, pos=pos, cache=cache, last_only=True)[:, 0].float()


@functools.cache
def compiled_decode():
    """decode through torch.compile, made at first use (importing the compiler is slow); it compiles
    at its first call, for all shapes (dynamic)."""
    return torch.compile(decode, dynamic=True)


class GraphedDecode:
    """compiled_decode() on a static cache, captured as one CUDA graph and replayed (choice 5). The
    first call runs the step for real (warm-up, compiling); capture records the next step without
    running it; every later call copies its inputs into the graph's and replays."""

    def __init__(self, model, cache):
        self.model, self.cache, self.graph = model, cache, None

    def __call__(self, tokens, pos):
        if self.graph is None:
            self.tokens, self.pos = tokens.clone(), pos.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = compiled_decode()(self.model, self.cache, self.tokens, self.pos)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = compiled_decode()(self.model, self.cache, self.tokens, self.pos)
            return logits
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def generate(model, prompts, n=1, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, eos_ids=(),
             seed=0, pad_id=0, compile=False) -> list[Sample]:
    """Sample n completions of each prompt (lists of token ids). temperature=0 is greedy. seed: an int,
    or one int per prompt (choice 2). Returns len(prompts) * n Samples, prompt-major: the n samples
    of prompt 0 first."""
    if not prompts:
        return []
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(seeds) not in (1, len(prompts)):
        raise ValueError(f"seed: one int, or one per prompt ({len(prompts)}), not {len(seeds)}")
    check_prompts(model, prompts, max_new_tokens)
    device = model.lm_head.weight.device
    B, N = len(prompts), len(prompts) * n
    tokens, valid, pos = left_pad(prompts, pad_id, device)  # (B, P) each

    cache = model.new_cache(N, tokens.shape[1] + max_new_tokens)  # allocated once, for all N rows
    prefill = cache.prefix(B)
    logits = model(tokens, pos=pos, valid=valid, cache=prefill, last_only=True)[:, 0].float()  # (B, V)
    cache.tile_from(prefill)  # row j * B + i: sample j of prompt i (choice 2)
    logits = logits.repeat(n, 1)  # (N, V)
    next_pos = valid.sum(1).repeat(n)  # (N,) position of each row's first new token

    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    if compile:  # choice 5
        cache.go_static()
        step = GraphedDecode(model, cache) if device.type == "cuda" else (
            lambda tokens, pos: compiled_decode()(model, cache, tokens, pos))
    else:
        def step(tokens, pos):
            with sdpa_kernel(NO_CUDNN) if device.type == "cuda" else contextlib.nullcontext():  # choice 4
                return decode(model, cache, tokens, pos)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    out = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(N, max_new_tokens, device=device)
    length = torch.zeros(N, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)  # stopped on an end token
    live = slice(None)  # the rows still in the batch: all of them, then a (R,) index once finished rows left (choice 3)
    for t in range(max_new_tokens):
        tok, lp = sample(logits, temperature, top_k, top_p, generators,
                         None if isinstance(live, slice) else live, N)  # (R,)
        ended = done[live]  # (R,): rows that finished before this step are not touched
        out[live, t] = tok.masked_fill(ended, pad_id)
        logprobs[live, t] = lp.masked_fill(ended, 0.0)
        length[live] += ~ended
        ended = ended | torch.isin(tok, eos)  # (R,): and those that finish now
        done[live] = ended
        n_ended = int(ended.sum())  # one host sync a step; the rows that left had all ended
        if t + 1 == max_new_tokens or n_ended == ended.numel():
            break
        if not compile and n_ended * 4 >= ended.numel():  # a quarter has finished: they leave (choice 3)
            stay = (~ended).nonzero()[:, 0]  # (R',)
            cache.keep_rows(stay)
            live = stay if isinstance(live, slice) else live[stay]
        logits = step(out[live, t:t + 1], (next_pos[live] + t)[:, None])

    out, logprobs, length, done = out.tolist(), logprobs.tolist(), length.tolist(), done.tolist()
    rows = [j * B + i for i in range(B) for j in range(n)]  # back to prompt-major
    return [Sample(r % B, out[r][:length[r]], logprobs[r][:length[r]], done[r]) for r in rows]


@torch.no_grad()
def greedy(model, prompts, max_new_tokens, eos_ids=(), pad_id=0, batch_size=None) -> list[list[int]]:
    """The greedy completion of each prompt, in the prompts' order, batched by length (choice 6)."""
    was_training = model.training
    model.eval()
    batch_size = batch_size or (512 if model.lm_head.weight.device.type == "cuda" else 64)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        samples = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=0,
                           eos_ids=eos_ids, pad_id=pad_id)
        for i, s in zip(idx, samples):
            out[i] = s.tokens
    model.train(was_training)
    return out


@torch.inference_mode()
def generate_naive(model, prompts, max_new_tokens, pad_id=0):
    """Greedy decoding that re-runs the full forward over prompt + tokens so far at every step, no
    cache: the slow reference for tests and the benchmark. Returns new tokens (B, max_new_tokens)."""
    tokens, valid, pos = left_pad(prompts, pad_id, model.lm_head.weight.device)
    for _ in range(max_new_tokens):
        tok = model(tokens, pos=pos, valid=valid, last_only=True)[:, 0].argmax(-1)  # (B,)
        tokens = torch.cat([tokens, tok[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return tokens[:, -max_new_tokens:]


# ---- benchmark: python rollout.py --bench ----

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # the cards' specified memory bandwidth


def decode_bytes(model, B, slots):
    """Bytes a decode step must read from memory at least: every weight once (the embedding table
    is read through the tied lm_head, or not at all when untied: only B of its rows) and the keys and
    values of `slots` cache slots per row."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not c.tie_word_embeddings:
        weights -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    kv = 2 * c.num_hidden_layers * B * c.num_key_value_heads * slots * c.head_dim * model.lm_head.weight.element_size()
    return weights + kv


@torch.no_grad()
def logprob_error(model, prompts, samples, every=8):
    """Mean |sampler's log-prob - one full forward's| over the tokens of every 8th sample: the check
    that the (compiled) decode computes what the model computes; in bfloat16 ~1e-2 is rounding."""
    errors = []
    for s in samples[::every]:
        p = prompts[s.prompt_index]
        seq = torch.tensor([p + s.tokens], device=model.lm_head.weight.device)
        lp = torch.log_softmax(model(seq)[0, len(p) - 1:-1].float(), dim=-1)
        want = lp.gather(-1, seq[0, len(p):, None])[:, 0]
        errors.append((torch.tensor(s.logprobs, device=want.device) - want).abs().mean().item())
    return sum(errors) / len(errors)


def bench(model, name, batches, new_tokens, prompt_len, naive_max, compile=False):
    device = model.lm_head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak = next((bw for card, bw in HBM_BYTES_PER_S.items()
                 if device.type == "cuda" and card in torch.cuda.get_device_name(device)), None)
    g = torch.Generator().manual_seed(0)
    for B in batches:
        prompts = torch.randint(0, model.config.vocab_size, (B, prompt_len), generator=g).tolist()
        for T in new_tokens:
            generate(model, prompts, max_new_tokens=T, temperature=0, compile=compile)  # warm-up (and compile)
            sync()
            t0 = time.perf_counter()
            # no end token: every row runs T steps
            out = generate(model, prompts, max_new_tokens=T, temperature=0, compile=compile)
            sync()
            dt = time.perf_counter() - t0
            cached = B * T / dt
            line = (f"{name:>12} | B={B:<3} prompt={prompt_len} new={T:<4} | "
                    f"{'compiled' if compile else 'cache'} {cached:9.1f} tok/s")
            line += f" | mean |log-prob - full forward's| {logprob_error(model, prompts, out):.4f}"
            if device.type == "cuda":  # memory-bound decode: bytes read per step over the step's time
                slots = prompt_len + T if compile else prompt_len + T / 2  # static: all slots; else the filled ones
                bw = decode_bytes(model, B, slots) * T / dt
                line += f" | {bw / 1e9:6.0f} GB/s" + (f" = {bw / peak:5.1%} of HBM" if peak else "")
            if B * T <= naive_max and not compile:
                generate_naive(model, prompts, 4)
                t0 = time.perf_counter()
                generate_naive(model, prompts, T)
                sync()
                naive = B * T / (time.perf_counter() - t0)
                line += f" | recompute {naive:9.1f} tok/s | speed-up {cached / naive:6.1f}x"
            elif not compile:
                line += f" | recompute skipped (B*new > --naive-max {naive_max})"
            print(line, flush=True)


def run_bench(args, device):
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, greedy, {'bfloat16' if device.type == 'cuda' else 'float32'}"
          f"{', --compile' if args.compile else ''}")
    cpu, dtype = device.type == "cpu", (torch.float32 if device.type == "cpu" else torch.bfloat16)
    random_model = lambda cfg: M.Transformer(cfg).to(device, dtype).eval()  # weights don't change the speed
    runs = {  # name: (build the model, batch sizes, new tokens)
        "tiny": (lambda: random_model(M.tiny_config(M.TINY_VOCAB)), (1, 32), (128, 512)),
        "qwen2.5-0.5b": (lambda: random_model(M.qwen25_05b_config()), (1, 4) if cpu else (1, 32),
                         (32,) if cpu else (128, 512)),
        "qwen2.5-1.5b": (lambda: random_model(M.qwen25_15b_config()), (1, 4) if cpu else (1, 32),
                         (32,) if cpu else (128, 512)),
    }
    if args.model:
        runs = {args.model.rstrip("/").split("/")[-1]: (lambda: M.load_model(args.model, device), (1, 32), (128, 512))}
    only = set(args.only.split(",")) if args.only else set()
    unknown = only - set(runs) if not args.model else set()
    if unknown:
        raise ValueError(f"--only: no default model {', '.join(sorted(unknown))} (models: {', '.join(runs)})")
    for name, (build, batches, new_tokens) in runs.items():
        if (only and name not in only) or (not only and name == "qwen2.5-1.5b"):
            continue
        torch.manual_seed(0)
        bench(build(), name, args.batches or batches, args.new_tokens or new_tokens, args.prompt_len, args.naive_max,
              args.compile)


def run_cli(args, device):
    model, tok = M.load_model(args.model, device), load_tokenizer(args.model)
    texts = [tok.chat(x) if args.chat else x for x in args.prompt]
    prompts = [tok.encode(x, special=not args.chat) for x in texts]
    print(f"sampling {args.n} x {len(prompts)} from {args.model} on {device}", flush=True)
    samples = generate(model, prompts, n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, eos_ids=tok.eos_ids, seed=args.seed, pad_id=tok.pad_id)
    for k, s in enumerate(samples):
        end = "an end token" if s.stopped else "max-new-tokens"
        print(f"--- prompt {s.prompt_index}, sample {k % args.n} ({len(s.tokens)} tokens, stopped on {end})")
        print(tok.decode(s.tokens))


def ints(s):
    return [int(x) for x in s.split(",")]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Sample completions from a checkpoint, or benchmark the sampler.")
    g = p.add_argument_group("sampling")
    g.add_argument("--model", help="a Hugging Face style folder (config.json, safetensors, tokenizer.json)")
    g.add_argument("--prompt", action="append", help="a prompt; repeat the flag for a batch of prompts")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat format")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per sample at most")
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set holding this mass (1: off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler's generator")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    b = p.add_argument_group("benchmark")
    b.add_argument("--bench", action="store_true", help="tokens/s of the cache sampler against the recompute loop")
    b.add_argument("--batches", type=ints, default=None,
                   help="batch sizes, comma-separated (default 1,32; 1,4 for the 0.5B shape on CPU)")
    b.add_argument("--new-tokens", type=ints, default=None,
                   help="new tokens, comma-separated (default 128,512; 32 for the 0.5B shape on CPU)")
    b.add_argument("--prompt-len", type=int, default=32, help="prompt length of the benchmark's random prompts")
    b.add_argument("--naive-max", type=int, default=4096,
                   help="run the recompute loop only where batch * new tokens <= this")
    b.add_argument("--only", help="benchmark only these default models, comma-separated: tiny, qwen2.5-0.5b, "
                                  "qwen2.5-1.5b (default: the first two)")
    b.add_argument("--compile", action="store_true", help="decode through torch.compile (+ a CUDA graph on CUDA)")
    b.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = M.default_device() if args.device == "auto" else torch.device(args.device)

    try:
        if args.bench:
            run_bench(args, device)
        else:
            if not args.model or not args.prompt:
                p.error("give --model DIR and at least one --prompt (or --bench)")
            run_cli(args, device)
    except (M.CheckpointError, ValueError) as e:  # bad folder, prompt too long, ...: one line, no traceback
        raise SystemExit(f"error: {e}")
