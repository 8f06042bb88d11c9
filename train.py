"""The command line and the training loops of ReaLM.

    python train.py --stage distill            # guided CoT distillation: the SFT cold start -> out/distill/
    python train.py --stage rl                 # GRPO with MRPV rewards and EAAI annealing -> out/rl/
    python train.py --stage eval --init DIR    # accuracy alone and with routes, on test and the hard split
    torchrun --nproc_per_node=N train.py --stage rl    # the same run over N processes
    python train.py --stage ablate             # the paper's comparisons: every arm, 3 seeds -> out/ablate/results.md

Read top to bottom: flags -> set-up (device, student, problems, route banks) -> evaluation ->
checkpoints and metrics -> the distill stage -> the GRPO objective -> torchrun helpers -> the RL
stage -> the eval stage -> the ablation.

Choices that are ours:
1. Optimizer: AdamW (betas 0.9, 0.95), weight decay on matrices only, linear warm-up then cosine
   decay to 10 % of the peak learning rate, gradient clipping at 1.0. Parameters stay in float32;
   on CUDA the forward runs under bfloat16 autocast.
2. The default distillation budget (3,000 teacher-written problems, 600 steps of 16) is set so that
   SFT plateaus below the ceiling on the embedded domain: the student memorises its budget and lands
   well short of 100 % on test, which leaves RL something to add.
3. Evaluation is greedy. acc_with_routes shows K routes drawn from the split's own route bank with
   the default positive / negative mix, seeded per problem, so every evaluation sees the same prompts.
4. RL defaults, chosen on the dev split of the embedded domain (README, "RL, measured"): 8 prompts x
   8 samples a step at temperature 0.7, lr 3e-5, 120 steps, EAAI cosine decay over the first 60 %.
   On CUDA the rollouts sample from a bfloat16 copy of the float32 weights, so the first epoch's
   ratio is 1 up to bfloat16 rounding (exactly 1 on CPU).
5. Sampling seeds are per prompt and step, so torchrun's N processes sample what one process
   would; minibatches (--num-minibatches) split by group, the same split every epoch.
6. The ablation gives every arm 60 RL steps (half the rl default) so that all nine arms over three
   seeds fit in 3 hours on 2 CPU cores, and runs two commands at a time on a CPU, one thread each
   (more steps per second than one two-thread run on the tiny model; README, "The ablation").
"""

import argparse
import copy
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import distill
import domain as D
import eaai
import model as M
import mrpv
from rollout import generate


# ---- flags ----

def get_args(argv=None):
    ap = argparse.ArgumentParser(description="ReaLM: distill, RL-train and evaluate a small model.")
    g = ap.add_argument_group("run")
    g.add_argument("--stage", choices=["distill", "rl", "eval", "ablate"], help="what to run (required unless --bench)")
    g.add_argument("--out", help="run folder (default out/<stage>; eval: the --init folder)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, routes and initialisation")
    g.add_argument("--resume", action="store_true", help="rl: continue the run in --out from its trainer_state.pt, with its flags; "
                   "ablate: run what --out's runs.jsonl lacks, with its flags")
    g.add_argument("--save-every", type=int, default=50, help="rl: save a checkpoint every k steps (0: only at the end)")
    g.add_argument("--max-bad-steps", type=int, default=3, help="rl: stop after this many non-finite steps in a row")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g = ap.add_argument_group("model and data")
    g.add_argument("--init", default=None,
                   help="start: 'scratch' (the tiny default model) or a Hugging Face folder (default: scratch for distill, "
                        "out/distill for rl, run first when missing)")
    g.add_argument("--data", help="JSONL problems with teacher routes (default: the embedded domain)")
    g.add_argument("--eval-data", help="JSONL problems to evaluate on, with --data (default: none)")
    g = ap.add_argument_group("distillation")
    g.add_argument("--budget", type=int, default=3000, help="teacher-written problems for SFT (embedded domain)")
    g.add_argument("--unguided", action="store_true", help="distil from the teacher WITHOUT the rules (the baseline)")
    g.add_argument("--R", type=int, default=3, help="positive and negative routes per problem in the route bank, each")
    g.add_argument("--mrpv-share", type=float, default=0.1, help="share of SFT examples in the MRPV format")
    g.add_argument("--sft-eaai", action=argparse.BooleanOptionalAction, default=False,
                   help="MRPV SFT examples show what EAAI shows in RL: 1..K routes, partly shown")
    g.add_argument("--K", type=int, default=3, help="routes shown in an MRPV prompt")
    g.add_argument("--neg-share", type=float, default=0.5, help="expected share of wrong routes among those shown")
    g = ap.add_argument_group("rl (GRPO; flag names follow TRL's where one exists)")
    g.add_argument("--num-generations", type=int, default=8, help="samples per prompt (the group)")
    g.add_argument("--prompts-per-step", type=int, default=8, help="prompts per optimizer step")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (the loss uses the same)")
    g.add_argument("--epsilon", type=float, default=0.2, help="PPO clip: ratio kept above 1 - epsilon")
    g.add_argument("--epsilon-high", type=float, default=None, help="PPO clip: ratio kept below 1 + epsilon_high (default epsilon)")
    g.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient to the frozen start (0: no reference model is loaded)")
    g.add_argument("--loss-type", default="token", choices=["token", "sequence"], help="token mean over the batch, or per-sequence mean then batch mean")
    g.add_argument("--scale-rewards", action=argparse.BooleanOptionalAction, default=True, help="divide advantages by the group's std (--no-scale-rewards: Dr. GRPO)")
    g.add_argument("--mu", type=int, default=1, help="PPO epochs over each batch of samples (1 with one minibatch: exactly on-policy)")
    g.add_argument("--num-minibatches", type=int, default=1, help="optimizer steps per epoch, each over a share of the groups")
    g.add_argument("--algo", default="grpo", choices=["grpo", "rft"], help="grpo, or rft: fine-tune on the policy's own right answers")
    g.add_argument("--routes", default="mrpv", choices=["mrpv", "none"], help="show external routes (MRPV) or never (plain GRPO)")
    g.add_argument("--no-anneal", action="store_true", help="routes at full signal all along (CoT-Synthesizer style)")
    g.add_argument("--reward", default="mrpv", choices=["mrpv", "answer", "steps"],
                   help="mrpv: answer + verdicts + step + format; answer: answer + format; steps: mrpv plus credit for "
                        "each line of the model's own chain that matches a right route (our addition, not the paper's)")
    g.add_argument("--w-verdict", type=float, default=0.5, help="weight of the verdict reward")
    g.add_argument("--w-step", type=float, default=0.5, help="weight of the first-wrong-step reward (0: off)")
    g.add_argument("--w-format", type=float, default=0.1, help="weight of the format reward")
    g.add_argument("--verdict-gate", action=argparse.BooleanOptionalAction, default=False,
                   help="a completion that skips the verdict on a shown route scores 0 in total")
    g.add_argument("--eaai-shape", default="cosine", choices=eaai.SHAPES, help="shape of the EAAI decay")
    g.add_argument("--eaai-hold", type=float, default=0.0, help="share of steps at full signal before the decay")
    g.add_argument("--eaai-decay", type=float, default=0.6, help="share of steps over which the signal decays to 0")
    g.add_argument("--eaai-partial", action=argparse.BooleanOptionalAction, default=True,
                   help="as h decays, show only the first h share of each route's lines (--no-eaai-partial: whole routes, "
                        "fewer of them and on fewer prompts)")
    g = ap.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600 for distill, 120 for rl, 60 rl steps an arm for ablate)")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    g.add_argument("--micro-tokens", type=int, default=4096,
                   help="gradient accumulation: a step's batch, sorted by length, runs in micro-batches of at most this many padded tokens")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: distill 2e-3 from scratch, 1e-5 from a checkpoint; rl 3e-5 on the "
                        "embedded domain, 1e-6 on --data)")
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 30 for distill, 3 for rl)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in the backward (less memory)")
    g.add_argument("--compile", action="store_true", help="rl: decode through torch.compile (+ a CUDA graph on CUDA)")
    g = ap.add_argument_group("benchmark")
    g.add_argument("--bench", choices=["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b"],
                   help="time --steps RL steps (default 3, the first a warm-up) of a random-weight model of this shape "
                        "on the embedded domain at the other flags' settings, phase by phase")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every k steps (0: only at the end)")
    g.add_argument("--eval-n", type=int, default=210, help="problems per evaluation split")
    g.add_argument("--max-new-tokens", type=int, default=160, help="tokens generated per answer at most")
    g.add_argument("--eval-splits", default="test,hard", help="eval and ablate: the embedded splits to evaluate on "
                   "(dev, test, hard; choose settings on dev, never on test)")
    g = ap.add_argument_group("ablation (--stage ablate; the rl and distillation flags above apply to every arm)")
    g.add_argument("--arms", help=f"comma-separated arms (default: all; --quick: {','.join(QUICK_ARMS)}); of: {','.join(ARMS)}")
    g.add_argument("--seeds", type=int, default=None, help="seeds per arm, from --seed on (default 3; --quick: 1)")
    g.add_argument("--quick", action="store_true", help="the key arms (unless --arms), one seed (unless --seeds)")
    g.add_argument("--distill-steps", type=int, default=600, help="steps of each seed's distillation")
    g.add_argument("--jobs", type=int, default=None, help="runs at a time, sharing the CPU cores (default: 2 on CPU, 1 on CUDA)")
    args = ap.parse_args(argv)
    if not args.stage and not args.bench:
        ap.error("the following arguments are required: --stage (or --bench)")
    if args.bench:
        args.stage, args.init, args.eval_n = "rl", "scratch", 0
        args.steps = args.steps or 3
        args.out = args.out or f"out/bench-{args.bench}"
    if args.init is None:
        args.init = {"distill": "scratch", "rl": "out/distill"}.get(args.stage)
    if args.steps is None:
        args.steps = {"rl": 120, "ablate": 60}.get(args.stage, 600)
    if args.lr is None:
        if args.stage in ("rl", "ablate"):
            args.lr = 1e-6 if args.data else 3e-5
        else:
            args.lr = 2e-3 if args.init == "scratch" else 1e-5
    if args.warmup is None:
        args.warmup = 3 if args.stage in ("rl", "ablate") else 30
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    if args.stage == "ablate":  # for results.md
        args.command = " ".join(["python train.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    return args


# ---- set-up ----

def pick_device(name):
    return M.default_device() if name == "auto" else torch.device(name)


def load_student(args, device):
    """The tiny default model with the domain's tokenizer, or a checkpoint folder (fp32 for training)."""
    if args.init == "scratch":
        tok = D.tokenizer()
        torch.manual_seed(args.seed)
        shapes = {"tiny": lambda: M.tiny_config(tok.vocab_size, max_position_embeddings=1024),
                  "qwen2.5-0.5b": M.qwen25_05b_config, "qwen2.5-1.5b": M.qwen25_15b_config}
        model = M.Transformer(shapes[args.bench or "tiny"]()).to(device)  # a bench shape: random weights
        return model, tok
    return M.load_model(args.init, device, torch.float32), M.load_tokenizer(args.init)


def embedded_banks(problems, R, seed, guided=True):
    rng = random.Random(f"routes-{seed}")
    return [distill.embedded_bank(p, R, rng, guided) for p in problems]


def train_set(args):
    """Problems with their route banks: the embedded domain's teacher, or the routes of a JSONL file."""
    if args.data:
        problems = D.load_jsonl(args.data)
        return problems, [p.routes for p in problems]
    problems = D.split("train", args.budget, args.seed)
    return problems, embedded_banks(problems, args.R, args.seed, guided=not args.unguided)


def eval_sets(args, splits):
    """{split: (problems, banks)}: the --eval-data file, none for --data without one, else the embedded
    domain's splits (with a fixed seed, whatever --seed is)."""
    if args.eval_data:
        problems = D.load_jsonl(args.eval_data)
        return {"eval": (problems, [p.routes for p in problems])}
    if args.data or args.eval_n == 0:
        return {}
    return {s: (ps := D.split(s, args.eval_n), embedded_banks(ps, args.R, seed=1000)) for s in splits}


def splits_of(args):
    splits = [s for s in args.eval_splits.split(",") if s]
    for s in splits:
        if s not in ("dev", "test", "hard"):
            raise D.DataError(f"--eval-splits: unknown split {s!r} (dev, test, hard)")
    return splits


# ---- evaluation ----

@torch.no_grad()
def accuracy(model, tok, problems, routes, max_new_tokens, batch_size=256, free_form=False):
    """Greedy exact-answer accuracy on prompts showing `routes[i]` for problem i (empty: autonomous)."""
    was_training = model.training
    model.eval()
    right = 0
    for i in range(0, len(problems), batch_size):
        ps, rs = problems[i:i + batch_size], routes[i:i + batch_size]
        prompts = [distill.encode_prompt(tok, mrpv.build_prompt(p, r)) for p, r in zip(ps, rs)]
        samples = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0,
                           eos_ids=tok.eos_ids, pad_id=tok.pad_id)
        right += sum(D.check(mrpv.answer_of(tok.decode(s.tokens), free_form), p.answer) for s, p in zip(samples, ps))
    model.train(was_training)
    return right / max(1, len(problems))


def evaluate(model, tok, problems, banks, args):
    """acc_autonomous (no routes) and acc_with_routes (K routes from the bank, seeded per problem)."""
    shown = [mrpv.select_routes(b, args.K, args.neg_share, random.Random(f"eval-{i}")) for i, b in enumerate(banks)]
    free = bool(args.data)  # real data: free-form answers (domain.extract_answer)
    return {"acc_autonomous": accuracy(model, tok, problems, [[]] * len(problems), args.max_new_tokens, free_form=free),
            "acc_with_routes": accuracy(model, tok, problems, shown, args.max_new_tokens, free_form=free)}


def evaluate_and_log(model, tok, evals, args, path, step, **extra):
    """Evaluate on each split, append a line per split to `path`, print the figures."""
    for split, (ps, bs) in evals.items():
        acc = evaluate(model, tok, ps, bs, args)
        log(path, step=step, split=split, **acc, **extra)
        tqdm.write(f"{'' if step is None else f'step {step} '}{split} ({len(ps)} problems): "
                   f"acc_autonomous {acc['acc_autonomous']:.3f} acc_with_routes {acc['acc_with_routes']:.3f}")


# ---- checkpoints and metrics ----

def log(path: Path, **row):
    """Append one JSON object as a line (metrics.jsonl, eval.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


RUN_FILES = ("metrics.jsonl", "routes.jsonl", "eval.jsonl")  # a run folder's own files, kept across saves


def fresh_run_folder(out: Path):
    """Empty the run folder for a new run; refuse a folder that is not one of ours."""
    if out.exists() and any(out.iterdir()):
        if not any((out / f).exists() for f in ("config.json", "metrics.jsonl", "ablate.json")):
            raise D.DataError(f"--out {out} exists and is not a run folder (no config.json, metrics.jsonl or ablate.json)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def save_run(model, tok, out: Path, state: dict):
    """The contract layout, written to a temporary folder and renamed over `out`: config.json,
    model.safetensors, tokenizer files, trainer_state.pt, and the run's own files (metrics, routes)."""
    def extra(tmp):
        torch.save(state, tmp / "trainer_state.pt")
        for name in RUN_FILES:
            if (out / name).is_file():
                shutil.copyfile(out / name, tmp / name)
    M.save_model(model, out, tok, extra=extra)


def lr_at(step, args):
    """Linear warm-up, then cosine decay to 10 % of the peak (choice 1)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    u = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, u))))


def autocast_for(device):
    """bfloat16 autocast on CUDA; plain float32 elsewhere (choice 1)."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def eval_due(step, args):
    """Evaluate every --eval-every steps (0: never in between) and after the last step."""
    return (args.eval_every and step % args.eval_every == 0) or step == args.steps


def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


# ---- the distill stage ----

def micro_batches(batch, max_tokens):
    """Sort examples by length and cut them into micro-batches of at most max_tokens padded tokens
    (at least one example each): short autonomous examples are not padded to long MRPV ones."""
    batch = sorted(batch, key=lambda e: len(e[0]) + len(e[1]))
    micro = []
    for e in batch:
        if micro and (len(micro) + 1) * (len(e[0]) + len(e[1])) > max_tokens:
            yield micro
            micro = []
        micro.append(e)
    yield micro


def run_distill(args):
    device = pick_device(args.device)
    out = Path(args.out or "out/distill")
    model, tok = load_student(args, device)
    problems, banks = train_set(args)
    rng = random.Random(args.seed)
    examples = distill.sft_examples(problems, banks, tok, args.mrpv_share, args.K, args.neg_share, rng, args.sft_eaai)
    if not examples:
        raise D.DataError("no SFT example: no problem has a positive (correct) route")
    teacher_acc = distill.teacher_accuracy(banks)
    if not args.data:  # what guidance buys: the embedded teacher with and without the rules
        acc = {g: sum(D.teacher_route(p, guided=g).correct for p in problems) / len(problems) for g in (True, False)}
        print(f"teacher accuracy on the {len(problems)} problems: {100 * acc[True]:.1f} % with the rules, "
              f"{100 * acc[False]:.1f} % without them")
    evals = eval_sets(args, ["dev", "test"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"distill: {'UNGUIDED' if args.unguided else 'guided'} teacher right on {100 * teacher_acc:.1f} % of "
          f"{len(problems)} problems -> {len(examples)} SFT examples ({args.mrpv_share:.0%} MRPV); student "
          f"{n_params / 1e6:.1f}M params on {device}; writing {out}/", flush=True)
    fresh_run_folder(out)
    metrics = out / "metrics.jsonl"
    D.save_jsonl([D.Problem(p.question, p.answer, p.rules, b) for p, b in zip(problems, banks)], out / "routes.jsonl")

    opt = make_optimizer(model, args)
    autocast = autocast_for(device)
    model.train()
    bar = tqdm(range(args.steps), desc="distill", dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        batch = [examples[rng.randrange(len(examples))] for _ in range(args.batch_size)]
        n_tokens = sum(len(r) for _, r in batch)  # the loss is a mean over the whole batch's response tokens
        loss_sum = 0.0
        for micro in micro_batches(batch, args.micro_tokens):
            x, y = distill.sft_batch(micro, tok.pad_id, device)
            with autocast:
                loss = distill.sft_loss(model, x, y, n_tokens)
            loss.backward()
            loss_sum += loss.item()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        log(metrics, stage="distill", step=step + 1, loss=loss_sum, lr=opt.param_groups[0]["lr"], reward=None, hint=None)
        if eval_due(step + 1, args):
            evaluate_and_log(model, tok, evals, args, metrics, step + 1)
    state = {"stage": "distill", "step": args.steps, "optimizer": opt.state_dict(), "args": vars(args),
             "rng": {"python": rng.getstate(), "torch": torch.get_rng_state()}}
    save_run(model, tok, out, state)
    print(f"distill: {args.steps} steps in {time.time() - t0:.0f} s; wrote {out}/ "
          f"(model, tokenizer, trainer_state.pt, metrics.jsonl, routes.jsonl)")


# ---- the RL objective: GRPO with an explicit PPO-clip loss ----

def group_advantages(rewards, n, scale=True, eps=1e-4):
    """rewards (G * n,), the n samples of each prompt adjacent -> advantages (G * n,).
    A_i = (r_i - mean of its group) / (std of its group + eps); scale=False drops the std (Dr. GRPO).
    A group whose rewards are all equal gets A = 0: no policy gradient."""
    r = rewards.view(-1, n)  # (G, n)
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, keepdim=True, unbiased=False) + eps)
    return a.flatten()


def sequence_logprobs(model, prompts, completions, pad_id, temperature=1.0):
    """Log-probs of each completion token under log_softmax(logits / T), from one forward over
    prompt + completion: prompts left-padded as in rollout.generate, completions right-padded.
    Returns logp (N, L) and mask (N, L) (1.0 on real completion tokens)."""
    device = model.lm_head.weight.device
    N, P, L = len(prompts), max(map(len, prompts)), max(1, max(map(len, completions)))
    tokens = torch.full((N, P + L), pad_id, dtype=torch.long)
    valid = torch.zeros(N, P + L, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, P - len(p):P + len(c)] = torch.tensor(p + c, dtype=torch.long)
        valid[i, P - len(p):P + len(c)] = True
    tokens, valid = tokens.to(device), valid.to(device)
    pos = (valid.cumsum(1) - 1).clamp(min=0)  # the positions rollout.generate gave these tokens
    logits = model(tokens, pos=pos, valid=valid)[:, P - 1:P + L - 1]  # (N, L, V): position t predicts t + 1
    logp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[:, P:, None])[..., 0]  # (N, L)
    return logp, valid[:, P:].float()


def grpo_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0, ref_logp=None, loss_type="token"):
    """The PPO-clip surrogate with group-relative advantages. logp, old_logp, ref_logp, mask: (N, L);
    adv: (N,). Returns the loss to minimise and a dict of statistics."""
    ratio = torch.exp(logp - old_logp)  # (N, L) per-token ratio; exactly 1 at the first epoch on-policy
    A = adv[:, None]  # (N, 1): every token of a sample shares its advantage
    per_token = -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)  # (N, L), sign: minimise
    kl = torch.zeros_like(logp)
    if beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(policy || reference), >= 0 per token
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


# ---- torchrun: one process per device, gradients summed over processes ----

def dist_setup(device_name):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA with
    one GPU per process, gloo on CPU. A plain `python train.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def sum_grads(model, world):
    """Sum every parameter's gradient over the processes. Each process's loss is already its share of
    the whole batch's mean, so the sum is the gradient one process would get from the whole batch.
    One all-reduce per tensor: simple, not overlapped with the backward."""
    if world > 1:
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def sum_floats(xs, world, device):
    """Sum a list of floats over the processes."""
    if world == 1:
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(xs, world):
    """Concatenate a list held by each process, in rank order (metrics only)."""
    if world == 1:
        return xs
    parts = [None] * world
    dist.all_gather_object(parts, xs)
    return [x for part in parts for x in part]


# ---- the RL stage ----

class TrainingError(Exception):
    pass


def rl_start(args, device):
    """The policy and its problems with route banks. On the embedded default the start is out/distill,
    made first when missing; the bank is the distill run's routes.jsonl (the teacher's budget)."""
    if args.init == "out/distill" and not args.data and not Path("out/distill/config.json").is_file():
        print("rl: no out/distill/ yet: running the distill stage first (python train.py --stage distill)", flush=True)
        run_distill(get_args(["--stage", "distill", "--device", args.device, "--seed", str(args.seed)]))
    model, tok = load_student(args, device)
    if args.data:
        problems = D.load_jsonl(args.data)
        return model, tok, problems, [p.routes for p in problems]
    bank = Path(args.init) / "routes.jsonl"
    if args.init != "scratch" and bank.is_file():
        problems = D.load_jsonl(bank)
        return model, tok, problems, [p.routes for p in problems]
    if args.init != "scratch":
        raise D.DataError(f"{bank}: no route bank (python train.py --stage distill writes one; or give --data FILE)")
    problems, banks = train_set(args)  # ReaLM-Zero: no distillation, but the same teacher's route bank
    return model, tok, problems, banks


def rl_resume(args, out: Path):
    """--resume: the saved run's trainer state and flags (the command line's other flags are ignored,
    so the resumed run is the run that was interrupted)."""
    path = out / "trainer_state.pt"
    if not path.is_file():
        raise D.DataError(f"--resume: {path} not found (a run saves it every --save-every steps and at the end)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("stage") != "rl":
        raise D.DataError(f"--resume: {path} is from the {state.get('stage')} stage, not rl")
    return state, saved_args("rl", state["args"], device=args.device, out=str(out))


def saved_args(stage, saved: dict, **now):
    """A saved run's flags for --resume; flags added since it was saved take their defaults."""
    return argparse.Namespace(**{**vars(get_args(["--stage", stage])), **saved, "resume": True, **now})


def rl_prompts(step, problems, banks, annealer, rng, args):
    """The step's global batch: --prompts-per-step problems, each with the routes EAAI lets it show.
    Every process draws the same batch (same seeds) and then keeps its own share."""
    idx = [rng.randrange(len(problems)) for _ in range(args.prompts_per_step)]
    hints = [annealer.hint(step) for _ in idx]
    shown = [[mrpv.show(r, h.frac) for r in mrpv.select_routes(banks[i], h.k, args.neg_share, rng)] if h.show else []
             for i, h in zip(idx, hints)]
    return idx, shown


def policy_update(model, ref, opt, batch, args, world, pad_id):
    """The PPO-clip update. batch: (prompt, completion, old log-probs, advantage, group) per sample of
    this process. --mu epochs; each epoch is --num-minibatches optimizer steps, minibatch m holding the
    groups g with g % M == m (the same split each epoch; our choice); each minibatch runs in micro-batches
    of at most --micro-tokens padded tokens (gradient accumulation). Returns (mean loss, stats, bad
    optimizer steps): a step whose loss or gradient is not finite is skipped, not taken."""
    device = model.lm_head.weight.device
    autocast = autocast_for(device)
    M_ = args.num_minibatches
    losses, clip, kl, bad, t_opt = [], [], [], 0, 0.0
    for _ in range(args.mu):
        for m in range(M_):
            part = [e for e in batch if e[4] % M_ == m]
            # the loss is a mean over the whole minibatch, on every process: its tokens (or sequences) summed over processes
            n_local = sum(len(e[1]) for e in part) if args.loss_type == "token" else len(part)
            n = sum_floats([n_local], world, device)[0]
            if n == 0:
                continue  # nothing to learn from (RFT with no right sample)
            loss_sum = clip_sum = kl_sum = 0.0
            for micro in (micro_batches(part, args.micro_tokens) if part else []):
                prompts, completions = [e[0] for e in micro], [e[1] for e in micro]
                with autocast:
                    logp, mask = sequence_logprobs(model, prompts, completions, pad_id, args.temperature)
                ref_logp = None
                if ref is not None:
                    with torch.no_grad(), autocast:
                        ref_logp, _ = sequence_logprobs(ref, prompts, completions, pad_id, args.temperature)
                old = torch.zeros_like(logp)  # (n, L): the sampler's log-probs, right-padded
                for k, e in enumerate(micro):
                    old[k, :len(e[2])] = torch.tensor(e[2], device=device)
                adv = torch.tensor([e[3] for e in micro], device=device)
                loss, st = grpo_loss(logp, old, adv, mask, args.epsilon, args.epsilon_high, args.beta, ref_logp, args.loss_type)
                share = (mask.sum().item() if args.loss_type == "token" else len(micro)) / n  # this micro-batch's part of the mean
                (loss * share).backward()
                loss_sum += loss.item() * share
                clip_sum += st["clip_frac"] * share
                kl_sum += st["kl"] * share
            t = clock(device)
            sum_grads(model, world)
            loss_sum, clip_sum, kl_sum = sum_floats([loss_sum, clip_sum, kl_sum], world, device)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
            if not (math.isfinite(loss_sum) and torch.isfinite(norm)):  # the same verdict on every process
                bad += 1
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            t_opt += clock(device) - t
            losses.append(loss_sum), clip.append(clip_sum), kl.append(kl_sum)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return mean(losses), {"clip_frac": mean(clip), "kl": mean(kl), "time_optimizer": t_opt}, bad


def clock(device):
    """Wall-clock seconds, after the device's queued work (phase timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def refresh(sampler, model):
    """Copy the trained weights into the sampler (a bf16 copy on CUDA; the model itself elsewhere)."""
    if sampler is not model:
        with torch.no_grad():
            for a, b in zip(sampler.parameters(), model.parameters()):
                a.copy_(b)


def run_rl(args):
    rank, world, device = dist_setup(args.device)
    out = Path(args.out or "out/rl")
    state = None
    if args.resume:
        state, args = rl_resume(args, out)
    model, tok, problems, banks = rl_start(args, device)
    model.grad_checkpointing = args.grad_checkpointing
    ref = None
    if args.beta > 0:  # the frozen start, for the k3 KL term; not loaded at all when beta is 0
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    if state:
        model.load_state_dict(M.load_model(out, device, torch.float32).state_dict())
    sampler = model  # samples and evaluations; on CUDA a bfloat16 copy of the float32 weights (choice 1)
    if device.type == "cuda":
        sampler = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    G = args.num_generations
    if args.prompts_per_step % world:
        raise D.DataError(f"--prompts-per-step {args.prompts_per_step} is not a multiple of the {world} processes")
    hold = args.steps if args.no_anneal else round(args.eaai_hold * args.steps)
    schedule = eaai.Schedule(args.eaai_shape, hold, round(args.eaai_decay * args.steps))
    annealer = eaai.Annealer(schedule, args.K if args.routes == "mrpv" else 0, seed=args.seed, vary_length=args.eaai_partial)
    weights = mrpv.Weights(verdict=args.w_verdict, step=args.w_step, format=args.w_format)
    if args.reward == "answer":
        weights = mrpv.Weights(verdict=0.0, step=0.0, format=args.w_format)
    if args.reward == "steps":
        weights.chain = 1.0
    weights.gate = args.verdict_gate
    references = [next((r.text for r in b if r.correct), None) for b in banks]  # a right route, for --reward steps
    evals = eval_sets(args, ["dev", "test"]) if rank == 0 else {}
    opt = make_optimizer(model, args)
    rng = random.Random(args.seed)
    metrics = out / "metrics.jsonl"
    start = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        annealer.load_state_dict(state["eaai"])
        rng.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        start = state["step"]
        if rank == 0:  # drop what the interrupted run logged after its last checkpoint
            rows = [r for r in metrics.read_text().splitlines() if json.loads(r)["step"] <= start]
            metrics.write_text("".join(r + "\n" for r in rows))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"rl: {args.algo} {args.init} -> {out}/ on {device}{f' x {world} processes' if world > 1 else ''}; "
        f"{len(problems)} problems with route banks; {args.steps} steps of {args.prompts_per_step} prompts x {G} "
        f"samples; routes {args.routes}{', no anneal' if args.no_anneal else ''}; reward {args.reward}"
        f"{f'; resuming after step {start}' if start else ''}", flush=True)
    if rank == 0 and not state:
        fresh_run_folder(out)
        evaluate_and_log(sampler, tok, evals, args, metrics, 0)
    if world > 1:
        dist.barrier()

    def save(step):
        if rank == 0:
            save_run(model, tok, out, {"stage": "rl", "step": step, "optimizer": opt.state_dict(), "args": vars(args),
                                       "eaai": annealer.state_dict(),
                                       "rng": {"python": rng.getstate(), "torch": torch.get_rng_state()}})
        if world > 1:
            dist.barrier()

    t0, bad_run, last_save = time.time(), 0, start
    bar = tqdm(range(start, args.steps), desc="rl", dynamic_ncols=True, disable=rank != 0, initial=start, total=args.steps)
    for step in bar:
        ts = t0_step = clock(device)
        M.peak_memory_reset(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        # ---- rollout: the global batch of prompts with EAAI's external signal; this process's share, n samples each ----
        idx, shown = rl_prompts(step, problems, banks, annealer, rng, args)
        mine = list(range(rank, len(idx), world))  # global prompt numbers this process samples
        prompts = [distill.encode_prompt(tok, mrpv.build_prompt(problems[idx[g]], shown[g])) for g in mine]
        seeds = [(args.seed * 100_003 + step) * 1_000 + g for g in mine]  # per prompt: independent of the split
        sampler.eval()
        samples = generate(sampler, prompts, n=G, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           eos_ids=tok.eos_ids, seed=seeds, pad_id=tok.pad_id, compile=args.compile)
        model.train()
        now = clock(device)
        t_rollout, ts = now - ts, now
        # ---- rewards and group-relative advantages (a group lives on one process) ----
        rewards = [mrpv.reward(tok.decode(s.tokens), problems[idx[mine[s.prompt_index]]], shown[mine[s.prompt_index]],
                               weights, references[idx[mine[s.prompt_index]]], free_form=bool(args.data)) for s in samples]
        total = torch.tensor([r.total for r in rewards])
        if args.algo == "rft":  # fine-tune on the policy's own right answers: advantage 1 each, the rest dropped
            adv = [1.0 if r.answer == 1 else None for r in rewards]
        else:
            adv = group_advantages(total, G, args.scale_rewards).tolist()
        batch = [(prompts[s.prompt_index], s.tokens, s.logprobs, a, mine[s.prompt_index])
                 for s, a in zip(samples, adv) if a is not None]
        now = clock(device)
        t_reward, ts = now - ts, now
        # ---- the update ----
        loss, stats, bad = policy_update(model, ref, opt, batch, args, world, tok.pad_id)
        refresh(sampler, model)
        t_update = clock(device) - ts
        bad_run = bad_run + 1 if bad else 0
        # ---- metrics over every process's samples ----
        rows = gather([(r.total, r.answer, r.verdict, r.step, r.format, r.chain, len(s.tokens), sum(s.logprobs))
                       for r, s in zip(rewards, samples)], world)
        col = lambda j: [row[j] for row in rows if row[j] is not None]
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        groups = torch.tensor(col(0)).view(-1, G)
        n_tokens = sum(col(6))
        trained_tokens = sum_floats([sum(len(e[0]) + len(e[1]) for e in batch)], world, device)[0] * args.mu
        h = schedule.h(step)
        if rank == 0:
            log(metrics, stage="rl", step=step + 1, loss=loss, reward=mean(col(0)), hint=h,
                **{f"reward_{k}": mean(col(j)) for j, k in enumerate(("answer", "verdict", "step", "format", "chain"), 1)},
                response_len=n_tokens / len(rows), entropy=-sum(col(7)) / max(1, n_tokens),  # sampled-token estimate
                zero_adv_groups=float((groups.std(1) == 0).float().mean()), skipped_updates=bad,
                lr=opt.param_groups[0]["lr"], **stats, step_s=round(time.perf_counter() - t0_step, 3),
                time_rollout=t_rollout, time_reward=t_reward, time_backward=t_update - stats["time_optimizer"],
                sampled_tokens=n_tokens, trained_tokens=trained_tokens,
                peak_gib=M.peak_memory_gib(device))
        bar.set_postfix(reward=f"{mean(col(0)):.2f}", answer=f"{mean(col(1)):.2f}", h=f"{h:.2f}")
        if bad_run >= args.max_bad_steps:
            where = f"{out}/ holds the last good checkpoint (step {last_save})" if last_save else "no checkpoint was written"
            raise TrainingError(f"loss or gradient not finite in {bad_run} steps in a row (to step {step + 1}): "
                                f"stopped; {where}")
        if rank == 0 and eval_due(step + 1, args):
            evaluate_and_log(sampler, tok, evals, args, metrics, step + 1)
        if not bad and (step + 1 == args.steps or (args.save_every and (step + 1) % args.save_every == 0)):
            save(step + 1)
            last_save = step + 1
    say(f"rl: steps {start + 1}..{args.steps} in {time.time() - t0:.0f} s; wrote {out}/")
    if world > 1:
        dist.destroy_process_group()


# ---- the eval stage ----

def run_eval(args):
    if args.init is None:
        raise D.DataError("--stage eval needs --init DIR (a checkpoint folder, e.g. out/distill)")
    splits = splits_of(args)
    device = pick_device(args.device)
    model, tok = M.load_model(args.init, device), M.load_tokenizer(args.init)
    sets = eval_sets(args, splits)
    if not sets:
        raise D.DataError("--stage eval with --data needs --eval-data FILE (the problems to evaluate on)")
    out = Path(args.out or args.init)
    out.mkdir(parents=True, exist_ok=True)
    print(f"eval: {args.init} on {device}; appending to {out / 'eval.jsonl'}", flush=True)
    evaluate_and_log(model, tok, sets, args, out / "eval.jsonl", None, init=args.init)


# ---- the ablation: python train.py --stage ablate ----
# Every arm is a plain `train.py` command run as a subprocess (its log beside its folder), from the same
# seed's distilled start with the same RL budget, then evaluated by `--stage eval`; the table is built
# from the eval lines. The commands are the ones a user would type, so any row can be rerun alone.

ARMS = {  # name: (what it is, its start: the seed's "guided" or "unguided" distillation or None: scratch, rl flags or None: no rl)
    "distill": ("distillation only (guided SFT, no RL)", "guided", None),
    "rft": ("RFT: fine-tune on its own right answers, no routes", "guided", ["--algo", "rft", "--routes", "none", "--reward", "answer"]),
    "grpo": ("GRPO without routes, answer reward", "guided", ["--routes", "none", "--reward", "answer"]),
    "cot-synth": ("CoT-Synthesizer style: routes always, answer reward", "guided", ["--no-anneal", "--reward", "answer"]),
    "mrpv": ("MRPV without EAAI: routes always, answer + verdict rewards", "guided", ["--no-anneal"]),
    "eaai": ("EAAI without the verdict rewards: routes fade, answer reward", "guided", ["--reward", "answer"]),
    "realm": ("ReaLM: MRPV + EAAI", "guided", []),
    "unguided-realm": ("ReaLM from the unguided distillation", "unguided", []),
    "zero": ("ReaLM-Zero: ReaLM from the random-weight model, no SFT", None, []),
}
QUICK_ARMS = ("distill", "grpo", "cot-synth", "realm")
# flags of the ablate command passed on to each stage's command when they differ from that stage's default
DISTILL_FLAGS = ("budget", "R", "mrpv_share", "sft_eaai", "K", "neg_share", "batch_size", "micro_tokens", "device")
RL_FLAGS = ("R", "K", "neg_share", "num_generations", "prompts_per_step", "temperature", "epsilon", "epsilon_high",
            "beta", "loss_type", "scale_rewards", "mu", "num_minibatches", "w_verdict", "w_step", "w_format",
            "verdict_gate", "eaai_shape", "eaai_hold", "eaai_decay", "eaai_partial", "batch_size", "micro_tokens",
            "lr", "warmup", "weight_decay", "grad_clip", "grad_checkpointing", "compile", "max_new_tokens", "budget",
            "device")
EVAL_FLAGS = ("R", "K", "neg_share", "max_new_tokens", "eval_n", "eval_splits", "device")


def flags_of(args, names, stage):
    """The command-line flags that give `stage` the values of args.<name> that differ from its defaults."""
    defaults = vars(get_args(["--stage", stage]))
    flags = []
    for name in names:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if value == defaults[name]:
            continue
        if isinstance(value, bool):  # store_true flags default to False; BooleanOptional ones have --no-
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


class Run(NamedTuple):
    key: tuple  # (arm, seed), or ("guided" / "unguided", seed) for a distillation
    needs: tuple | None  # the distillation it starts from
    folder: Path  # what it writes (an arm's eval.jsonl lands here)
    cmds: list  # its train.py commands, run one after another


def ablate_runs(args, out: Path, arms, seeds):
    """Each seed's distillation(s), then each arm: rl from that start, then eval."""
    py = [sys.executable, str(Path(__file__).resolve())]
    distill_cmd = [*py, "--stage", "distill", "--eval-n", "0", "--steps", str(args.distill_steps),
                   *flags_of(args, DISTILL_FLAGS, "distill")]
    rl_cmd = [*py, "--stage", "rl", "--eval-n", "0", "--save-every", "0", "--steps", str(args.steps),
              *flags_of(args, RL_FLAGS, "rl")]
    eval_cmd = [*py, "--stage", "eval", *flags_of(args, EVAL_FLAGS, "eval")]
    runs = []
    for s in seeds:
        start = {"guided": out / f"seed{s}" / "distill", "unguided": out / f"seed{s}" / "distill-unguided"}
        for kind, folder in start.items():
            if any(ARMS[a][1] == kind for a in arms):
                unguided = ["--unguided"] if kind == "unguided" else []
                runs.append(Run((kind, s), None, folder, [[*distill_cmd, "--seed", str(s), "--out", str(folder), *unguided]]))
        for a in arms:
            _, kind, rl_flags = ARMS[a]
            folder = out / f"seed{s}" / a
            init = str(start[kind]) if kind else "scratch"
            cmds = [] if rl_flags is None else [[*rl_cmd, "--seed", str(s), "--init", init, "--out", str(folder), *rl_flags]]
            cmds.append([*eval_cmd, "--init", str(start[kind] if rl_flags is None else folder), "--out", str(folder)])
            runs.append(Run((a, s), kind and (kind, s), folder, cmds))
    return runs


def run_logged(run: Run, threads: int):
    """Run a Run's commands one after another, their output to <folder>.log; (seconds, None or the error)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = run.folder.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a") as f:
        for cmd in run.cmds:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
                lines = [x for x in log.read_text().replace("\r", "\n").splitlines() if x.strip()]
                return time.time() - t0, f"{log}: {lines[-1] if lines else 'failed'}"
    return time.time() - t0, None


def run_ablate(args):
    if args.data:
        raise D.DataError("--stage ablate runs on the embedded domain (no --data)")
    out = Path(args.out or "out/ablate")
    saved = out / "ablate.json"
    if args.resume:  # the saved command's flags; runs already finished (runs.jsonl) are skipped
        if not saved.is_file():
            raise D.DataError(f"--resume: {saved} not found")
        args = saved_args("ablate", json.loads(saved.read_text())["args"], jobs=args.jobs, out=str(out))
    arms = args.arms.split(",") if args.arms else list(QUICK_ARMS if args.quick else ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise D.DataError(f"--arms: unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    seeds = [args.seed + i for i in range(args.seeds or (1 if args.quick else 3))]
    splits = splits_of(args)
    jobs = args.jobs or (1 if pick_device(args.device).type == "cuda" else 2)
    if not args.resume:
        fresh_run_folder(out)
        saved.write_text(json.dumps({"command": args.command, "args": vars(args)}, indent=1) + "\n")
    done = out / "runs.jsonl"
    finished = {tuple(json.loads(x)["key"]) for x in done.read_text().splitlines()} if done.is_file() else set()
    pending = [r for r in ablate_runs(args, out, arms, seeds) if r.key not in finished]
    print(f"ablate: arms {', '.join(arms)}; seeds {', '.join(map(str, seeds))}; {args.steps} rl steps of "
          f"{args.prompts_per_step} prompts x {args.num_generations} samples each, from each seed's distillation "
          f"({args.distill_steps} steps); eval on {', '.join(splits)}; {len(pending)} runs, {jobs} at a time; "
          f"writing {out}/ (each run's output in its .log)", flush=True)
    cores, failed, t0 = os.cpu_count() or 1, [], time.time()
    bar = tqdm(total=len(pending), desc="ablate", dynamic_ncols=True)
    with ThreadPoolExecutor(jobs) as pool:
        running = {}
        while pending or running:
            ready = [r for r in pending if r.needs is None or r.needs in finished]
            for r in ready[:jobs - len(running)]:
                threads = max(1, cores // min(jobs, len(ready) + len(running)))  # alone: every core
                running[pool.submit(run_logged, r, threads)] = (r, threads)
                pending.remove(r)
            if not running:  # what is left waits on a run that failed
                break
            for fut in wait(running, return_when=FIRST_COMPLETED).done:
                (r, threads), (seconds, error) = running.pop(fut), fut.result()
                bar.update()
                if error:
                    failed.append(error)
                    tqdm.write(f"failed: {error}")
                    continue
                finished.add(r.key)
                if r.key[0] in ARMS:  # its results first: a run in runs.jsonl is never rerun by --resume
                    for split, row in last_eval(r.folder).items():
                        log(out / "results.jsonl", arm=r.key[0], seed=r.key[1], split=split,
                            acc_autonomous=row["acc_autonomous"], acc_with_routes=row["acc_with_routes"])
                log(done, key=list(r.key), minutes=round(seconds / 60, 2), threads=threads,
                    commands=[" ".join(c) for c in r.cmds])
                write_table(out, arms, seeds, splits, args)
                name = r.key[0] if r.key[0] in ARMS else f"{r.key[0]} distillation"
                tqdm.write(f"{name}, seed {r.key[1]}: done in {seconds / 60:.1f} min ({threads} threads)")
    bar.close()
    if done.is_file():
        write_table(out, arms, seeds, splits, args)
    print(f"ablate: {time.time() - t0:.0f} s; wrote {out}/results.md and results.jsonl")
    if failed or pending:
        raise TrainingError(f"{len(failed)} run(s) failed and {len(pending)} did not start; first: {failed[0]} "
                            f"(fix it, then: python train.py --stage ablate --out {out} --resume)")


def last_eval(folder: Path):
    """{split: the last eval line of that split} in a run folder's eval.jsonl."""
    return {row["split"]: row for row in map(json.loads, (folder / "eval.jsonl").read_text().splitlines())}


def mean_std(xs, sign=""):
    """'41.9 ± 1.2' in percent (sample std over seeds, none for one seed); sign="+": '+1.9 ± 0.4'."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{100 * m:{sign}.1f}"
    return f"{100 * m:{sign}.1f} ± {100 * (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5:.1f}"


def write_table(out: Path, arms, seeds, splits, args):
    """results.md: per arm and split, accuracy alone and with routes, mean ± std over the seeds done;
    then each arm minus the distilled start of the same seed (paired, so the start's spread cancels)."""
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()] if (out / "results.jsonl").is_file() else []
    acc = {(r["arm"], r["seed"], r["split"], k): r[k] for r in rows for k in ("acc_autonomous", "acc_with_routes")}  # a rerun's line wins
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    minutes = lambda name: [r["minutes"] for r in runs if r["key"][0] == name]
    done = lambda a: [s for s in seeds if (a, s, splits[0], "acc_autonomous") in acc]
    kinds = ("acc_autonomous", "acc_with_routes")

    def diff(a, b, split, k):  # per seed that has both: a - b, in points
        return [acc[a, s, split, k] - acc[b, s, split, k] for s in done(a) if s in done(b)]

    saved = json.loads((out / "ablate.json").read_text())
    machine = torch.cuda.get_device_name() if pick_device(args.device).type == "cuda" else cpu_name()
    head = " | ".join(f"{s} alone | {s} with routes" for s in splits)
    lines = ["# ReaLM ablation on the embedded domain", "", f"`{saved['command']}`", "",
             f"- Every arm starts from the same seed's guided distillation ({args.distill_steps} steps; "
             f"{mean_or_dash(minutes('guided'))} min a seed) except where its row says otherwise, and gets the same "
             f"budget: {args.steps} RL steps of {args.prompts_per_step} prompts x {args.num_generations} samples.",
             f"- Greedy accuracy (%) on {args.eval_n} problems a split, mean ± std over the seeds done "
             f"(of {', '.join(map(str, seeds))}); 'alone': no routes in the prompt; 'with routes': {args.K} "
             f"teacher routes, right and wrong.",
             f"- Machine: {machine}; torch {torch.__version__}; the runs' times add up to "
             f"{sum(r['minutes'] for r in runs):.0f} min.", "",
             f"| arm | what | seeds | {head} | min a run |", "|---|---|---|" + "---|---|" * len(splits) + "---|"]
    for a in arms:
        cells = [mean_std([acc[a, s, sp, k] for s in done(a)]) if done(a) else "" for sp in splits for k in kinds]
        lines.append(f"| {a} | {ARMS[a][0]} | {len(done(a))} | " + " | ".join(cells) + f" | {mean_or_dash(minutes(a))} |")
    if "distill" in arms:
        lines += ["", "Each arm minus the distilled start of the same seed (points, mean ± std over seeds):", "",
                  f"| arm | {head} |", "|---|" + "---|---|" * len(splits)]
        for a in arms:
            if a != "distill" and diff(a, "distill", splits[0], kinds[0]):
                lines.append(f"| {a} | " + " | ".join(mean_std(diff(a, "distill", sp, k), "+") for sp in splits for k in kinds) + " |")
    for a, b, k, paper in (("realm", "cot-synth", "acc_with_routes", "+4.2"), ("realm", "grpo", "acc_autonomous", "+2.6"),
                           ("realm", "rft", "acc_autonomous", "+2.6")):
        if diff(a, b, splits[0], k):
            lines += ["", f"{a} minus {b}, {splits[0]} {'with routes' if k == 'acc_with_routes' else 'alone'}: "
                      f"{mean_std(diff(a, b, splits[0], k), '+')} points (paired over {len(diff(a, b, splits[0], k))} "
                      f"seed(s); the paper: {paper})."]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def mean_or_dash(xs):
    return f"{sum(xs) / len(xs):.1f}" if xs else "-"


def cpu_name():
    """'2 CPUs (Intel(R) Xeon(R) ...)' from /proc/cpuinfo where there is one."""
    name = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        name = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                     if x.startswith("model name")), name)
    return f"{os.cpu_count()} CPUs ({name})"


# ---- the benchmark: python train.py --bench SHAPE ----

def report_bench(args):
    """Print the phases of the benchmark's RL steps (the first step, a warm-up, left out)."""
    rows = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("stage") == "rl"][1:] or rows[-1:]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    sampled, trained = mean("sampled_tokens"), mean("trained_tokens")
    print(f"bench {args.bench}: {args.prompts_per_step} prompts x {args.num_generations} samples, up to "
          f"{args.max_new_tokens} new tokens, mu {args.mu}{', --compile' if args.compile else ''}"
          f"{', --grad-checkpointing' if args.grad_checkpointing else ''}; mean of {len(rows)} steps")
    for phase, tokens, what in [("rollout", sampled, "sampled"), ("reward", sampled, "scored"),
                                ("backward", trained, "trained (forward + backward)"), ("optimizer", None, "")]:
        t = mean(f"time_{phase}")
        print(f"  {phase:>9} {t:8.3f} s" + (f" | {tokens / t:9.0f} tok/s {what}" if tokens and t > 0 else ""))
    print(f"  {'step':>9} {mean('step_s'):8.3f} s | peak memory {max(r['peak_gib'] for r in rows):.2f} GiB")


def main(argv=None):
    args = get_args(argv)
    try:
        {"distill": run_distill, "rl": run_rl, "eval": run_eval, "ablate": run_ablate}[args.stage](args)
        if args.bench:
            report_bench(args)
    except (D.DataError, M.CheckpointError, TrainingError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
