"""The command line and the training loops of ReaLM.

    python train.py --stage distill            # guided CoT distillation: the SFT cold start -> out/distill/
    python train.py --stage rl                 # GRPO with MRPV rewards and EAAI annealing -> out/rl/
    python train.py --stage eval --init DIR    # accuracy alone and with routes, on test and the hard split
    torchrun --nproc_per_node=N train.py --stage rl    # the same run over N processes

Read top to bottom: set-up (device, student, problems, route banks) -> checkpoints and metrics -> the
distill stage -> the RL stage -> the eval stage. The flags are flags.py's table; the RL objective
(advantages, the PPO-clip loss, the policy update) is grpo.py; evaluation is evaluate.py.

Choices that are ours:
1. Optimizer: AdamW (betas 0.9, 0.95), weight decay on matrices only, linear warm-up, gradient clipping at
   1.0; then distill decays (cosine, to 10 % of the peak) and rl holds the peak, so that every arm's late,
   autonomous updates get the same rate (RESULTS.md). float32 parameters; bfloat16 autocast on CUDA.
2. The default distillation, chosen on dev (RESULTS.md, "A start that has learned"): the 3,000 taught problems of
   6,000 drawn (the route-only ones go to the route bank, for RL), 1,200 steps of 32 at peak lr 2e-3 (cosine), each
   batch + 32 verdict drills (distill.py choice 4); MRPV examples 30 % of each batch from the first step, half of
   them reading drills, half of those ordering (distill.py choice 5); the student model.tiny_config (width 128).
   MRPV examples from the first step, not after the student solves alone, and the order drills, are what brought
   its verdicts and its reading of R5 within the steps, on most seeds but not all; the entry names which, and what
   the recipe costs against the earlier 800-step one, measured side by side.
3. RL defaults, chosen on the dev split of the embedded domain (RESULTS.md): 8 prompts x 8 samples a
   step at temperature 0.7, lr 3e-5, 120 steps, EAAI cosine decay over the first 60 %, the distilled
   problems, advantages per reward component with consistent verdicts (grpo.py, mrpv.py). From a
   checkpoint the peak lr is lower (flags.PRETRAINED_LR). On CUDA rollouts sample from a bfloat16 copy of
   the weights: the first ratio is 1 up to rounding.
4. Sampling seeds are per prompt and step, so torchrun's N processes sample what one process would. The
   problems of each step and the routes shown come from two random streams, so arms with routes and without
   them (plain GRPO) train on the same problems, step by step.
5. metrics.jsonl is strict JSON: a value that is not a finite number (the loss of a skipped step) is
   written as null; such a step has skipped_updates > 0.
"""

import argparse
import copy
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import distill
import domain as D
import eaai
import evaluate as E
import flags as F
import grpo
import model as M
import mrpv
from rollout import generate
from tokenizer import Tokenizer, load_tokenizer


# ---- set-up ----

def load_student(args, device):
    """A random-weight model of --scratch-shape with the domain's tokenizer, or a checkpoint folder (fp32 for
    training)."""
    if args.init == "scratch":
        tok = D.tokenizer()
        torch.manual_seed(args.seed)
        return M.Transformer(F.SCRATCH_SHAPES[args.scratch_shape](tok.vocab_size)).to(device), tok
    return M.load_model(args.init, device, torch.float32), load_tokenizer(args.init)


def train_set(args):
    """Problems with their route banks: the routes of a JSONL file, or the embedded domain's teacher."""
    if args.data:
        return distill.jsonl_set(args.data)
    n = args.budget * (2 if args.route_rule != "none" else 1)  # the distillation's taught half, as many route-only
    return distill.embedded_set("train", n, args.R, args.seed, args.seed, not args.unguided, args.route_rule)


def eval_sets(args, splits):
    """{split: (problems, banks)}: the --eval-data file; none for --data without one; else the embedded splits
    (fixed seeds)."""
    if args.eval_data:
        return {"eval": distill.jsonl_set(args.eval_data)}
    if args.data or args.eval_n == 0:
        return {}
    n = lambda s: D.EVAL_SIZES[s] if args.eval_n is None else args.eval_n
    return {s: distill.embedded_set(s, n(s), args.R, 0, 1000, True, args.route_rule) for s in splits}


def evaluate_and_log(model, tok, evals, args, path, step, **extra):
    """Evaluate on each split (evaluate.py), append a line per split to `path`, print the figures; -> {split: acc}."""
    out = {}
    for split, (ps, bs) in evals.items():
        acc = out[split] = E.evaluate(model, tok, ps, bs, args)
        log(path, step=step, split=split, n=len(ps), **acc, **extra)  # acc: both accuracies and per-problem bits
        figure = lambda key: "-" if acc.get(key) is None else f"{acc[key]:.3f}"
        parts = "".join(f"; {part} ({acc[f'n_{part}']}): alone {figure(f'acc_autonomous_{part}')} with routes "
                        f"{figure(f'acc_with_routes_{part}')} verdicts {figure(f'verdict_acc_{part}')}"
                        for part in ("taught", "route_only") if acc.get(f"n_{part}"))
        tqdm.write(f"{'' if step is None else f'step {step} '}{split} ({len(ps)} problems): acc_autonomous "
                   f"{figure('acc_autonomous')} acc_with_routes {figure('acc_with_routes')} verdict_acc "
                   f"{figure('verdict_acc')}{parts}")
    return out


# ---- checkpoints and metrics ----

def log(path: Path, **row):
    """Append one JSON object as a line (metrics.jsonl, eval.jsonl); a non-finite float is written as null
    (choice 5)."""
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    with open(path, "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")


RUN_FILES = ("metrics.jsonl", "routes.jsonl", "eval.jsonl")  # a run folder's own files, kept across saves


def fresh_run_folder(out: Path):
    """Empty the run folder for a new run; refuse a folder that is not one of ours."""
    if out.exists() and any(out.iterdir()):
        if not any((out / f).exists() for f in ("config.json", "metrics.jsonl", "ablate.json")):
            raise D.DataError(f"--out {out} exists and is not a run folder (no config.json, metrics.jsonl or "
                              "ablate.json)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def save_run(model, tok, out: Path, state: dict):
    """The run-folder layout, written to a temporary folder and renamed over `out`: config.json,
    model.safetensors, tokenizer files, trainer_state.pt, and the run's own files (metrics, routes)."""
    def extra(tmp):
        torch.save(state, tmp / "trainer_state.pt")
        for name in RUN_FILES:
            if (out / name).is_file():
                shutil.copyfile(out / name, tmp / name)
    M.save_model(model, out, tok, extra=extra)


def lr_at(step, args):
    """Linear warm-up, then cosine decay to 10 % of the peak (choice 1), or the peak (--lr-schedule constant)."""
    if step < args.warmup or args.lr_schedule == "constant":
        return args.lr * min(1.0, (step + 1) / max(1, args.warmup))
    u = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, u))))


def eval_due(step, args):
    """Evaluate every --eval-every steps (0: never in between) and after the last step."""
    return (args.eval_every and step % args.eval_every == 0) or step == args.steps


def make_optimizer(model, args):
    """AdamW with weight decay on matrices only (choice 1)."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


# ---- the distill stage ----

def reads(args):  # whether the distillation adds reading drills: the embedded domain's route-only rule, guided
    return bool(args.reading) and not args.data and args.route_rule != "none" and not args.unguided


def drills(args):  # verdict drills a batch, on the embedded domain (distill.py choice 4)
    return 0 if args.data else args.drills


def sft_sets(args, problems, banks, tok, rng):
    """The taught problems' SFT examples, alone and in the MRPV format (item i: problem i both ways), with
    reading drills in place of a share of the MRPV examples (distill.py choice 5)."""
    taught = [i for i, p in enumerate(problems) if not D.route_only(p)]  # domain.py choice 5
    alone, routed = (distill.sft_examples([problems[i] for i in taught], [banks[i] for i in taught], tok, s, args.K,
                                          args.neg_share, rng, args.order) for s in (0.0, 1.0))
    if not alone:
        raise D.DataError("no SFT example: no problem has a positive (correct) route")
    if reads(args):
        worlds = distill.reading_set(len(routed), args.R, args.seed, args.route_rule, args.rule_drills,
                                     args.order_drills)
        reading = distill.sft_examples(*worlds, tok, 1.0, args.K, args.neg_share, rng, args.order)
        routed = [reading[i % len(reading)] if rng.random() < args.reading else r for i, r in enumerate(routed)]
    return len(taught), alone, routed


def distill_batch(step, opt, alone, routed, rng, tok, args):
    """Set the step's learning rate; -> its SFT batch, MRPV examples from --mrpv-from on (choice 2), + drills."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, args)
    share = args.mrpv_share if step >= args.mrpv_from * args.steps else 0.0
    return (distill.draw_batch(alone, routed, share, args.batch_size, rng)
            + distill.verdict_drills(drills(args), args.K, rng, tok))


def optimizer_step(model, opt, grad_clip):
    """Clip the gradient's norm (0: no clipping), step, clear the gradients."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_distill(args):
    device = F.pick_device(args.device)
    out = Path(args.out or "out/distill")
    model, tok = load_student(args, device)
    problems, banks = train_set(args)  # the route bank: every problem
    rng = random.Random(args.seed)
    n_taught, alone, routed = sft_sets(args, problems, banks, tok, rng)
    if not args.data:  # what guidance buys: the embedded teacher without the rules
        unguided = sum(D.teacher_route(p, False).correct for p in problems) / len(problems)
        print(f"without the rules the teacher is right on {unguided:.1%}")
    evals = eval_sets(args, D.eval_splits(args.eval_splits))  # settings are chosen on dev; eval gives test and hard
    mix = (f"{args.mrpv_share:.0%} MRPV from step {round(args.mrpv_from * args.steps)}"
           + (f", {args.reading:.0%} of them reading drills" if reads(args) else ""))
    teacher = f"{'UNGUIDED' if args.unguided else 'guided'} teacher right on {distill.teacher_accuracy(banks):.1%}"
    print(f"distill: {teacher} of {len(problems)} problems; SFT on the {n_taught} taught -> SFT examples ({mix}, "
          f"+ {drills(args)} verdict drills a batch); student {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params on {device}; writing {out}/", flush=True)
    fresh_run_folder(out)
    metrics = out / "metrics.jsonl"
    D.save_jsonl([D.Problem(p.question, p.answer, p.rules, b) for p, b in zip(problems, banks)], out / "routes.jsonl")
    opt, autocast = make_optimizer(model, args), grpo.autocast_for(device)
    model.train()
    bar, t0 = tqdm(range(args.steps), desc="distill", dynamic_ncols=True), time.time()
    for step in bar:
        batch = distill_batch(step, opt, alone, routed, rng, tok, args)
        loss_sum = distill.sft_step(model, batch, tok.pad_id, args.micro_tokens, autocast)
        optimizer_step(model, opt, args.grad_clip)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        log(metrics, stage="distill", step=step + 1, loss=loss_sum, lr=opt.param_groups[0]["lr"], reward=None,
            hint=None)
        if eval_due(step + 1, args):
            evaluate_and_log(model, tok, evals, args, metrics, step + 1)
    state = {"stage": "distill", "step": args.steps, "optimizer": opt.state_dict(), "args": vars(args),
             "rng": {"python": rng.getstate(), "torch": torch.get_rng_state()}}
    save_run(model, tok, out, state)
    print(f"distill: {args.steps} steps in {time.time() - t0:.0f} s; wrote {out}/ (model, tokenizer, "
          "trainer_state.pt, metrics, routes)")


# ---- the RL stage ----

class TrainingError(Exception):
    pass


@dataclass
class RLRun:
    """What an RL run carries from step to step."""
    model: M.Transformer  # the policy, float32, trained
    sampler: M.Transformer  # samples and evaluates: the model itself, on CUDA a bfloat16 copy (choice 3)
    ref: M.Transformer | None  # the frozen start for the k3 KL term; None (not loaded) when --beta is 0
    tok: Tokenizer
    problems: list  # domain.Problem
    banks: list  # per problem, its teacher routes (domain.Route), right and wrong
    annealer: eaai.Annealer  # how much external signal each prompt gets at a step
    weights: mrpv.Weights
    cfg: grpo.Config  # what the update reads
    opt: torch.optim.Optimizer
    rng: random.Random  # the problems drawn each step
    route_rng: random.Random  # the routes shown: its own stream, so every arm draws the same problems (choice 4)
    evals: dict  # {split: (problems, banks)}, rank 0 only
    start: int = 0  # the first step to run (after --resume, the saved step)


def rl_start(args, device):
    """The policy and its problems with route banks. On the embedded default the start is out/distill,
    made first when missing; the bank is the distill run's routes.jsonl (twice the teacher's budget with
    --route-rule deliver: the taught problems the distillation saw and as many route-only ones)."""
    if args.init == "out/distill" and not args.data and not Path("out/distill/config.json").is_file():
        print("rl: no out/distill/ yet: running the distill stage first (python train.py --stage distill)", flush=True)
        run_distill(F.parse(["--stage", "distill", "--device", args.device, "--seed", str(args.seed),
                             "--route-rule", args.route_rule]))
    model, tok = load_student(args, device)
    bank = Path(args.init) / "routes.jsonl"
    if args.data or (args.init != "scratch" and bank.is_file()):
        return model, tok, *distill.jsonl_set(args.data or bank)
    if args.init != "scratch":
        raise D.DataError(f"{bank}: no route bank (python train.py --stage distill writes one; or give --data FILE)")
    return model, tok, *train_set(args)  # ReaLM-Zero: no distillation, but the same teacher's route bank


def rl_resume(args, out: Path, rank):
    """--resume: the saved run's trainer state and flags (the command line's other flags are ignored, so
    the resumed run is the run that was interrupted); metrics logged after the last checkpoint are dropped."""
    path = out / "trainer_state.pt"
    if not path.is_file():
        raise D.DataError(f"--resume: {path} not found (a run saves it every --save-every steps and at the end)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("stage") != "rl":
        raise D.DataError(f"--resume: {path} is from the {state.get('stage')} stage, not rl")
    missing = [k for k in ("step", "optimizer", "args", "eaai", "rng") if k not in state]
    missing += [f"rng.{k}" for k in ("python", "routes", "torch") if k not in state.get("rng", {})]
    if missing:
        raise D.DataError(f"--resume: {path} lacks {', '.join(missing)} (a trainer state of another version?)")
    if rank == 0:
        rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= state["step"]]
        (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    return state, argparse.Namespace(**{**state["args"], "resume": True, "device": args.device, "out": str(out)})


def rl_setup(args, out, state, rank, device) -> RLRun:
    model, tok, problems, banks = rl_start(args, device)
    model.grad_checkpointing = args.grad_checkpointing
    ref = copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 else None
    if state:
        model.load_state_dict(M.load_model(out, device, torch.float32).state_dict())
    sampler = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False) if device.type == "cuda" else model
    hold = args.steps if args.no_anneal else round(args.eaai_hold * args.steps)
    schedule = eaai.Schedule(args.eaai_shape, hold, round(args.eaai_decay * args.steps))
    annealer = eaai.Annealer(schedule, args.K if args.routes == "mrpv" else 0, args.seed, vary_length=args.eaai_partial)
    answer_only = args.reward == "answer"
    weights = mrpv.Weights(verdict=0.0 if answer_only else args.w_verdict, step=0.0 if answer_only else args.w_step,
                           format=args.w_format, consistent=args.consistent)
    cfg = grpo.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(grpo.Config)})
    evals = eval_sets(args, D.eval_splits(args.eval_splits)) if rank == 0 else {}
    run = RLRun(model, sampler, ref, tok, problems, banks, annealer, weights, cfg, make_optimizer(model, args),
                random.Random(args.seed), random.Random(f"routes-{args.seed}"), evals)
    if state:
        run.opt.load_state_dict(state["optimizer"])
        annealer.load_state_dict(state["eaai"])
        run.rng.setstate(state["rng"]["python"])
        run.route_rng.setstate(state["rng"]["routes"])
        torch.set_rng_state(state["rng"]["torch"])
        run.start = state["step"]
    return run


def rl_prompts(step, run: RLRun, args):
    """The step's global batch: --prompts-per-step problems, each with the routes EAAI lets it show.
    Every process draws the same batch (same seeds) and then keeps its own share."""
    idx = [run.rng.randrange(len(run.problems)) for _ in range(args.prompts_per_step)]
    hints = [run.annealer.hint(step) for _ in idx]
    shown = [[mrpv.show(r, h.frac) for r in mrpv.select_routes(run.banks[i], h.k, args.neg_share, run.route_rng)]
             if h.show else [] for i, h in zip(idx, hints)]
    return idx, shown


def score(run: RLRun, samples, prompts, picked, shown, groups, args):
    """MRPV rewards and the update's batch (grpo.Example per sample kept). picked[j], shown[j], groups[j]: the
    problem, the routes shown and the global group of local prompt j."""
    rewards = [mrpv.reward(run.tok.decode(s.tokens), run.problems[picked[s.prompt_index]], shown[s.prompt_index],
                           run.weights, free_form=bool(args.data), order=args.order) for s in samples]
    if args.algo == "rft":  # fine-tune on the policy's own right answers: advantage 1 each, the rest dropped
        adv = [1.0 if r.answer == 1 else None for r in rewards]
    elif args.advantages == "component":  # per component, per token (grpo.py choice 5)
        on_verdict = [mrpv.on_verdict_lines([run.tok.decode([t]) for t in s.tokens]) for s in samples]
        w = {c: getattr(run.weights, c) for c in mrpv.PARTS}  # each component's weight
        adv = grpo.per_token_advantages(rewards, w, on_verdict, args.num_generations, args.scale_rewards)
    else:
        totals = torch.tensor([r.total for r in rewards])
        adv = grpo.group_advantages(totals, args.num_generations, args.scale_rewards).tolist()
    batch = [grpo.Example(prompts[s.prompt_index], s.tokens, s.logprobs, a, groups[s.prompt_index])
             for s, a in zip(samples, adv) if a is not None]
    return rewards, batch


def rl_row(step, run: RLRun, rewards, samples, batch, update, t, args, world, device):
    """The step's metrics.jsonl line, over every process's samples; update: policy_update's (loss, stats,
    skipped); t: the clock at the step's phase boundaries."""
    loss, stats, bad = update
    rows = grpo.gather([dict(total=r.total, answer=r.answer, verdict=r.verdict, step=r.step, format=r.format,
                             tokens=len(s.tokens), logp=sum(s.logprobs)) for r, s in zip(rewards, samples)], world)
    col = lambda k: [row[k] for row in rows if row[k] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    n_tokens = sum(col("tokens"))
    trained = grpo.sum_floats([sum(len(e.prompt) + len(e.completion) for e in batch)], world, device)[0] * args.mu
    equal = torch.tensor(col("total")).view(-1, args.num_generations).std(1) == 0  # groups with no advantage
    return dict(stage="rl", step=step + 1, loss=loss, reward=mean(col("total")), hint=run.annealer.schedule.h(step),
                **{f"reward_{k}": mean(col(k)) for k in ("answer", "verdict", "step", "format")},
                response_len=n_tokens / len(rows), entropy=-sum(col("logp")) / max(1, n_tokens),  # sampled tokens'
                zero_adv_groups=float(equal.float().mean()), skipped_updates=bad, lr=run.opt.param_groups[0]["lr"],
                **stats, step_s=round(time.perf_counter() - t[0], 3), time_rollout=t[1] - t[0],
                time_reward=t[2] - t[1], time_backward=t[3] - t[2] - stats["time_optimizer"],
                sampled_tokens=n_tokens, trained_tokens=trained, peak_gib=M.peak_memory_gib(device))


@torch.no_grad()
def copy_weights(dst: M.Transformer, src: M.Transformer):
    """dst's parameters take src's values (cast to dst's dtype), tensor by tensor, in place."""
    for d, s in zip(dst.parameters(), src.parameters(), strict=True):
        d.copy_(s)


def save_rl(run: RLRun, args, out, step, rank, world):
    if rank == 0:
        save_run(run.model, run.tok, out, {"stage": "rl", "step": step, "optimizer": run.opt.state_dict(),
                                           "args": vars(args), "eaai": run.annealer.state_dict(),
                                           "rng": {"python": run.rng.getstate(), "routes": run.route_rng.getstate(),
                                                   "torch": torch.get_rng_state()}})
    if world > 1:
        dist.barrier()


def rl_step(step, run: RLRun, args, rank, world, device):
    """One RL step (grpo.py's steps 1-7) -> (the metrics line, whether the update was skipped)."""
    t = [grpo.clock(device)]  # phase boundaries
    for g in run.opt.param_groups:
        g["lr"] = lr_at(step, args)
    # 1. the step's prompts, each with the routes EAAI lets it show; this process samples groups `mine`
    idx, shown = rl_prompts(step, run, args)
    mine = list(range(rank, len(idx), world))
    prompts = [distill.encode_prompt(run.tok, mrpv.build_prompt(run.problems[idx[g]], shown[g])) for g in mine]
    # 2. n samples per prompt with the sampler's log-probs (seeds per prompt: independent of the split, choice 4)
    run.sampler.eval()
    samples = generate(run.sampler, prompts, n=args.num_generations, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, eos_ids=run.tok.eos_ids, pad_id=run.tok.pad_id,
                       seed=[(args.seed * 100_003 + step) * 1_000 + g for g in mine], compile=args.compile)
    run.model.train()
    t.append(grpo.clock(device))
    # 3. rewards and 4. group-relative advantages (a group lives on one process)
    rewards, batch = score(run, samples, prompts, [idx[g] for g in mine], [shown[g] for g in mine], mine, args)
    t.append(grpo.clock(device))
    # 5-7. the PPO-clip update (grpo.py)
    update = grpo.policy_update(run.model, run.ref, run.opt, batch, run.cfg, world, run.tok.pad_id)
    if run.sampler is not run.model:  # CUDA: the bf16 sampler gets the new weights
        copy_weights(run.sampler, run.model)
    t.append(grpo.clock(device))
    row = rl_row(step, run, rewards, samples, batch, update, t, args, world, device)
    return {**row, "autonomous": not any(shown)}, update[2] > 0  # autonomous: no route in any prompt of the step


def run_rl(args):
    rank, world, device = grpo.dist_setup(F.pick_device(args.device))
    out = Path(args.out or "out/rl")
    state, args = rl_resume(args, out, rank) if args.resume else (None, args)
    run = rl_setup(args, out, state, rank, device)
    metrics = out / "metrics.jsonl"
    if rank == 0:
        print(f"rl: {args.algo} {args.init} -> {out}/ on {device}{f' x {world} processes' if world > 1 else ''}; "
              f"{len(run.problems)} problems with route banks; {args.steps} steps of {args.prompts_per_step} prompts "
              f"x {args.num_generations} samples; routes {args.routes}{', no anneal' if args.no_anneal else ''}; "
              f"reward {args.reward}{f'; resuming after step {run.start}' if run.start else ''}", flush=True)
    first = last = {}
    if rank == 0 and not state:
        fresh_run_folder(out)
        first = evaluate_and_log(run.sampler, run.tok, run.evals, args, metrics, 0)
    if world > 1:
        dist.barrier()
    t0, bad_run, last_save = time.time(), 0, run.start
    bar = tqdm(range(run.start, args.steps), desc="rl", dynamic_ncols=True, disable=rank != 0, initial=run.start,
               total=args.steps)
    for step in bar:
        M.peak_memory_reset(device)
        row, bad = rl_step(step, run, args, rank, world, device)
        bad_run = bad_run + 1 if bad else 0
        if rank == 0:
            log(metrics, **row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", answer=f"{row['reward_answer']:.2f}", h=f"{row['hint']:.2f}")
        if bad_run >= args.max_bad_steps:
            where = (f"{out}/ holds the last good checkpoint (step {last_save})" if last_save
                     else "no checkpoint was written")
            raise TrainingError(f"loss or gradient not finite in {bad_run} steps in a row (to step {step + 1}): "
                                f"stopped; {where}")
        if rank == 0 and eval_due(step + 1, args):
            last = evaluate_and_log(run.sampler, run.tok, run.evals, args, metrics, step + 1)
        if not bad and (step + 1 == args.steps or (args.save_every and (step + 1) % args.save_every == 0)):
            save_rl(run, args, out, step + 1, rank, world)
            last_save = step + 1
    if rank == 0:
        print(f"rl: steps {run.start + 1}..{args.steps} in {time.time() - t0:.0f} s; wrote {out}/")
        E.before_after(first, last)
    if world > 1:
        dist.destroy_process_group()


# ---- the eval stage ----

def run_eval(args):
    if args.init is None:
        raise D.DataError("--stage eval needs --init DIR (a checkpoint folder, e.g. out/distill)")
    device = F.pick_device(args.device)
    model, tok = M.load_model(args.init, device), load_tokenizer(args.init)
    sets = eval_sets(args, D.eval_splits(args.eval_splits))
    if not sets:
        raise D.DataError("--stage eval with --data needs --eval-data FILE (the problems to evaluate on)")
    if args.show:
        split, (problems, banks) = next(iter(sets.items()))
        return E.show(model, tok, problems, banks, args, split)
    out = Path(args.out or args.init)
    out.mkdir(parents=True, exist_ok=True)
    print(f"eval: {args.init} on {device}; appending to {out / 'eval.jsonl'}", flush=True)
    evaluate_and_log(model, tok, sets, args, out / "eval.jsonl", None, init=args.init)


def main(argv=None):
    try:
        args = F.parse(argv)
        {"distill": run_distill, "rl": run_rl, "eval": run_eval}[args.stage](args)
    except (D.DataError, M.CheckpointError, TrainingError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
