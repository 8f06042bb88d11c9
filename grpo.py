"""The RL objective: GRPO (group-relative policy optimisation) with an explicit PPO-clip loss.

One RL step, for G prompts with n samples each (TRL's names in brackets):

    1. sample      o_1..o_n ~ pi_old(. | q) for each prompt q   [num_generations = n]; keep
                   log pi_old(o_i,t | q, o_i,<t) per token (rollout.generate returns them)
    2. reward      r_i = mrpv.reward(o_i, ...).total                  (mrpv.py)
    3. advantage   A_i = (r_i - mean_j r_j) / (std_j r_j + eps)   over the n samples of q's group
                   [scale_rewards; without the std: Dr. GRPO]. Every token of o_i shares A_i;
                   or, per component (choice 5), A_i,t from the rewards that concern token t.
    4. ratio       rho_i,t = exp(log pi(o_i,t) - log pi_old(o_i,t)), from a training forward over
                   prompt + completion, log_softmax(logits / temperature) (the sampler's quantity)
    5. loss        l_i,t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
                           + beta * (exp(d) - d - 1),  d = log pi_ref - log pi   (k3 KL, >= 0)
                   [epsilon, epsilon_high, beta]
    6. aggregate   "token":    L = sum_i,t l_i,t / sum_i |o_i|     (every completion token of the batch)
                   "sequence": L = mean_i (sum_t l_i,t / |o_i|)    (each sequence's mean, then the mean)
                   [loss_type: TRL's "dapo" / "grpo"]
    7. update      mu epochs [num_iterations] over the batch, each num_minibatches optimizer
                   steps, each a gradient accumulated over micro-batches; a step whose loss or
                   gradient is not finite is skipped.

`Config` holds the settings the update reads, `Example` one sample of its batch.

On-policy (mu = 1, one minibatch) rho = 1 at every token, so the gradient is REINFORCE with the
group baseline: grad L = -sum A_i grad log pi(o_i,t) / N (tests/test_grpo.py checks it).

Choices that are ours:
1. Minibatch m holds the groups g with g % num_minibatches == m, the same split each epoch.
2. Micro-batches are cut by padded tokens (`micro_batches`), after sorting by length; each micro-batch's
   loss is weighted by its share of the minibatch's tokens (or sequences), so the accumulated gradient
   is that of the whole minibatch's mean whatever the cut.
3. Under torchrun each process holds whole groups; gradients are summed over processes (one all-reduce
   per tensor, not overlapped with the backward) after each process scaled its loss by its share of
   the global minibatch.
4. Parameters stay in float32; on CUDA the forward runs under bfloat16 autocast.
5. Advantages per component (train.py's default --advantages component, chosen on dev with mrpv's
   consistency, RESULTS.md; --advantages sample: one per sample): each reward component c is normalised
   in its group on its own, A^c_i = group_advantages(r^c); a token gets the weighted mean of the
   components that apply to its group (verdict and step need routes shown) and concern its line: on
   verdict lines verdict, step and format; on every other line (the model's own steps and answer) answer
   and format. So the answer's weight on the chain is fixed whatever is shown, verdict luck never pushes
   the chain's tokens, and a group's advantages do not depend on the other groups of the batch (nor on
   how torchrun shares the groups out).
"""

import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Config:
    """What the update reads (TRL's names where one exists; train.py's flags of the same names set them)."""
    temperature: float = 1.0  # the sampler's; log-probs are log_softmax(logits / temperature)
    epsilon: float = 0.2  # PPO clip: the ratio is kept above 1 - epsilon ...
    epsilon_high: float = 0.2  # ... and below 1 + epsilon_high
    beta: float = 0.0  # k3 KL coefficient to the frozen reference (0: none)
    loss_type: str = "token"  # "token" or "sequence" (step 6)
    mu: int = 1  # epochs over each batch of samples [num_iterations]
    num_minibatches: int = 1  # optimizer steps per epoch (choice 1)
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    micro_tokens: int = 4096  # padded tokens a micro-batch at most (choice 2)


class Example(NamedTuple):
    """One sample in the update's batch."""
    prompt: list  # token ids
    completion: list  # token ids
    old_logprobs: list  # log pi_old per completion token (the sampler's)
    advantage: float | list  # one for the sample, or one per completion token (choice 5)
    group: int  # the global index of its prompt: which minibatch it falls in (choice 1)


# ---- 3. advantages ----

def group_advantages(rewards, n, scale=True, eps=1e-4):
    """rewards (G * n,), the n samples of each prompt adjacent -> advantages (G * n,).
    A group whose rewards are all equal gets A = 0: no policy gradient."""
    r = rewards.view(-1, n)  # (G, n)
    a = r - r.mean(dim=1, keepdim=True)  # (G, n)
    if scale:
        a = a / (r.std(dim=1, keepdim=True, unbiased=False) + eps)
    return a.flatten()  # (G * n,)


def component_advantages(parts, weights, n, scale=True):
    """parts: {component: rewards (G * n,) with NaN where it does not apply}; weights: {component: w}.
    -> {component: advantages (G * n,)}, NaN in the groups where the component does not apply (choice 5)."""
    out = {}
    for c, r in parts.items():
        if weights.get(c, 0) > 0 and not torch.isnan(r).all():
            out[c] = group_advantages(r, n, scale)  # (G * n,): a group holding a NaN is NaN throughout
    return out


def per_token_advantages(rewards, weights, on_verdict, n, scale=True):
    """rewards: mrpv.Reward per sample (groups of n adjacent); weights: {component: w}; on_verdict: per
    sample, per token, whether the token lies on a verdict line -> per sample, its tokens' advantages."""
    nan = float("nan")
    parts = {c: torch.tensor([nan if getattr(r, c) is None else getattr(r, c) for r in rewards]) for c in weights}
    adv = component_advantages(parts, weights, n, scale)
    return [token_advantages(adv, weights, i, v) for i, v in enumerate(on_verdict)]


def token_advantages(adv, weights, i, on_verdict):
    """Sample i's per-token advantages: on_verdict[t] says whether token t lies on a verdict line (choice 5). Only
    the components that apply to sample i's group count, so a group's advantages do not depend on the others."""
    def mix(cs):
        cs = [c for c in cs if c in adv and not math.isnan(adv[c][i])]
        return sum(weights[c] * float(adv[c][i]) for c in cs) / sum(weights[c] for c in cs) if cs else 0.0
    a_verdict, a_chain = mix(("verdict", "step", "format")), mix(("answer", "format"))
    return [a_verdict if v else a_chain for v in on_verdict]


# ---- 4. the training forward's log-probs ----

def sequence_logprobs(model, prompts, completions, pad_id, temperature=1.0):
    """Log-probs of each completion token under log_softmax(logits / T), from one forward over
    prompt + completion: each row the prompt and its completion back to back from position 0 (the
    positions rollout.generate gave them), right-padded, so plain causal attention needs no mask, and
    logits computed at the completion tokens only. Returns logp (N, L) and mask (N, L) (1.0 on real
    completion tokens), both right-padded to L, the longest completion."""
    device = model.lm_head.weight.device
    N, W, L = (len(prompts), max(len(p) + len(c) for p, c in zip(prompts, completions)),
               max(1, max(map(len, completions))))
    tokens = torch.full((N, W), pad_id, dtype=torch.long)  # (N, W)
    keep = torch.zeros(N, W, dtype=torch.bool)  # (N, W): the positions that predict a completion token
    mask = torch.zeros(N, L, dtype=torch.bool)  # (N, L)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        keep[i, len(p) - 1:len(p) + len(c) - 1] = True  # position t predicts token t + 1
        mask[i, :len(c)] = True
    tokens, keep, mask = tokens.to(device), keep.to(device), mask.to(device)
    targets = tokens[:, 1:][keep[:, :-1]]  # (K,): the completion tokens, row by row
    logits = model(tokens, keep=keep)  # (K, V), K = all completion tokens, in the same order
    logp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[:, None])[:, 0]  # (K,)
    return torch.zeros(N, L, device=device, dtype=logp.dtype).masked_scatter(mask, logp), mask.float()


# ---- 5-6. the loss ----

def grpo_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0, ref_logp=None, loss_type="token"):
    """The PPO-clip surrogate with group-relative advantages. logp, old_logp, ref_logp, mask: (N, L);
    adv: (N,), or (N, L) per token. Returns the loss to minimise and a dict of statistics."""
    ratio = torch.exp(logp - old_logp)  # (N, L); exactly 1 at the first epoch on-policy
    A = adv[:, None] if adv.dim() == 1 else adv  # (N, 1): every token of a sample shares its advantage; or (N, L)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)  # (N, L), sign: minimise
    kl = torch.zeros_like(logp)  # (N, L)
    if beta > 0:
        d = ref_logp - logp  # (N, L)
        kl = torch.exp(d) - d - 1  # (N, L): k3 estimator of KL(policy || reference), >= 0 per token
        per_token = per_token + beta * kl
    if loss_type == "token":  # mean over every completion token of the batch
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "sequence":  # mean over each sequence's tokens, then over sequences
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        raise ValueError(f"loss_type {loss_type!r} is not 'token' or 'sequence'")
    clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))  # where the clip cuts the gradient
    n = mask.sum().clamp(min=1)
    stats = {"clip_frac": float((clipped * mask).sum() / n), "kl": float((kl.detach() * mask).sum() / n)}
    return loss, stats


# ---- 7. the policy update (and torchrun: one process per device, whole groups each) ----

def micro_batches(batch, max_tokens, overhead=64):
    """Sort examples (prompt, completion, ...) by length and cut them into micro-batches of at most
    max_tokens padded tokens (at least one example each), where the padded tokens plus `overhead` per
    micro-batch (its fixed cost, in tokens) are fewest: a dynamic programme over the cut points of the
    sorted list. Cutting only where the next example would not fit padded short examples to long ones."""
    batch = sorted(batch, key=lambda e: len(e[0]) + len(e[1]))
    lengths = [len(e[0]) + len(e[1]) for e in batch]
    best, cut = [0] + [math.inf] * len(batch), [0] * (len(batch) + 1)  # best[j]: cost of the first j examples
    for j in range(1, len(batch) + 1):  # the last micro-batch is batch[i:j]; it pads to lengths[j - 1]
        for i in range(j - 1, -1, -1):
            if i < j - 1 and (j - i) * lengths[j - 1] > max_tokens:
                break
            cost = best[i] + (j - i) * lengths[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    ends = [len(batch)]
    while ends[-1]:
        ends.append(cut[ends[-1]])
    ends.reverse()
    for i, j in zip(ends, ends[1:]):
        yield batch[i:j]


def autocast_for(device):
    """bfloat16 autocast on CUDA; plain float32 elsewhere (choice 4)."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def clock(device):
    """Wall-clock seconds, after the device's queued work (phase timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def dist_setup(device):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA with
    one GPU per process, gloo on CPU. A plain `python train.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def gather(xs, world):
    """Concatenate a list held by each process, in rank order (metrics only)."""
    if world == 1:
        return xs
    parts = [None] * world
    dist.all_gather_object(parts, xs)
    return [x for part in parts for x in part]


def sum_floats(xs, world, device):
    """Sum a list of floats over the torchrun processes."""
    if world == 1:
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_grads(model, world):
    """Sum every parameter's gradient over the processes (choice 3): each process's loss is already its
    share of the whole minibatch's mean, so the sum is the gradient one process would get from it all."""
    if world > 1:
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def minibatch_loss(model, ref, part: list[Example], n, cfg: Config, pad_id, n_tokens=None):
    """Forward and backward over one minibatch in micro-batches; each micro-batch's loss weighted by its
    share of the minibatch's n tokens (or sequences) summed over processes (choice 2), its clip_frac and kl
    (shares of tokens) by its share of the n_tokens tokens (default n), so that no figure depends on the cut.
    Returns the summed (loss, clip_frac, kl) of this process's share."""
    device = model.lm_head.weight.device
    autocast = autocast_for(device)
    loss_sum = clip_sum = kl_sum = 0.0
    for micro in micro_batches(part, cfg.micro_tokens):
        prompts, completions = [e.prompt for e in micro], [e.completion for e in micro]
        with autocast:
            logp, mask = sequence_logprobs(model, prompts, completions, pad_id, cfg.temperature)  # (m, L)
        ref_logp = None
        if ref is not None:
            with torch.no_grad(), autocast:
                ref_logp, _ = sequence_logprobs(ref, prompts, completions, pad_id, cfg.temperature)  # (m, L)
        old = torch.zeros_like(logp)  # (m, L): the sampler's log-probs, right-padded
        for k, e in enumerate(micro):
            old[k, :len(e.old_logprobs)] = torch.tensor(e.old_logprobs, device=device)
        adv = torch.zeros_like(logp)  # (m, L): each token's advantage (one per sample, or per token, choice 5)
        for k, e in enumerate(micro):
            adv[k, :len(e.completion)] = torch.as_tensor(e.advantage, device=device)
        loss, st = grpo_loss(logp, old, adv, mask, cfg.epsilon, cfg.epsilon_high, cfg.beta, ref_logp, cfg.loss_type)
        # this micro-batch's part of the mean
        share = (mask.sum().item() if cfg.loss_type == "token" else len(micro)) / n
        (loss * share).backward()
        loss_sum += loss.item() * share
        token_share = mask.sum().item() / (n if n_tokens is None else n_tokens)
        clip_sum += st["clip_frac"] * token_share
        kl_sum += st["kl"] * token_share
    return loss_sum, clip_sum, kl_sum


def policy_update(model, ref, opt, batch: list[Example], cfg: Config, world, pad_id):
    """The PPO-clip update over one step's samples: this process's Examples; ref: the frozen reference
    model or None (beta = 0). Returns (mean loss, stats, optimizer steps skipped as not finite)."""
    device = model.lm_head.weight.device
    M = cfg.num_minibatches
    losses, clip, kl, bad, t_opt = [], [], [], 0, 0.0
    for _ in range(cfg.mu):
        for m in range(M):
            part = [e for e in batch if e.group % M == m]  # choice 1
            # the loss is a mean over the whole minibatch, on every process: its tokens (or sequences) summed over
            # processes
            n_tokens, n_sequences = sum_floats([sum(len(e.completion) for e in part), len(part)], world, device)
            n = n_tokens if cfg.loss_type == "token" else n_sequences
            if n == 0:
                continue  # nothing to learn from (RFT with no right sample)
            loss_sum, clip_sum, kl_sum = (minibatch_loss(model, ref, part, n, cfg, pad_id, n_tokens) if part
                                          else (0.0, 0.0, 0.0))
            t = clock(device)
            sum_grads(model, world)
            loss_sum, clip_sum, kl_sum = sum_floats([loss_sum, clip_sum, kl_sum], world, device)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            if not (math.isfinite(loss_sum) and torch.isfinite(norm)):  # the same verdict on every process
                bad += 1
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            t_opt += clock(device) - t
            losses.append(loss_sum), clip.append(clip_sum), kl.append(kl_sum)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return mean(losses), {"clip_frac": mean(clip), "kl": mean(kl), "time_optimizer": t_opt}, bad
