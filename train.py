"""The command line and the training loops of ReaLM.

    python train.py --stage distill            # guided CoT distillation: the SFT cold start -> out/distill/
    python train.py --stage rl                 # GRPO with MRPV rewards and EAAI annealing -> out/rl/
    python train.py --stage eval --init DIR    # accuracy alone and with routes, on test and the hard split
    torchrun --nproc_per_node=N train.py --stage rl    # the same run over N processes
    python train.py --stage ablate --quick     # the paper's comparisons (ablate.py) -> out/ablate/results.md

Read top to bottom: flags -> set-up (device, student, problems, route banks) -> evaluation ->
checkpoints and metrics -> the distill stage -> torchrun helpers -> the RL stage -> the eval stage.
The RL objective itself (advantages, the PPO-clip loss, the policy update) is grpo.py.

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
3. Evaluation is greedy. acc_with_routes shows K routes drawn from the split's own route bank with
   the default positive / negative mix, seeded per problem, so every evaluation sees the same prompts.
4. RL defaults, chosen on the dev split of the embedded domain (RESULTS.md): 8 prompts x 8 samples a
   step at temperature 0.7, lr 3e-5, 120 steps, EAAI cosine decay over the first 60 %, the distilled
   problems (--fresh-problems lost on dev), advantages per reward component with
   consistent verdicts (grpo.py, mrpv.py). From a checkpoint the peak lr is lower (distill 1e-5, rl on --data 1e-6).
   On CUDA rollouts sample from a bfloat16 copy of the weights: the first ratio is 1 up to rounding.
5. Sampling seeds are per prompt and step, so torchrun's N processes sample what one process would.
6. metrics.jsonl is strict JSON: a value that is not a finite number (the loss of a skipped step) is
   written as null; such a step has skipped_updates > 0.
"""

import argparse
import copy
import json
import math
import os
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
import grpo
import model as M
import mrpv
from rollout import generate, greedy


# ---- flags ----

# Per-stage defaults (choices 2 and 4), literal; `python train.py --stage rl --help` shows rl's.
STAGE_DEFAULTS = {
    "distill": dict(init="scratch", steps=1200, lr=2e-3, warmup=30, lr_schedule="cosine"),
    "rl": dict(init="out/distill", steps=120, lr=3e-5, warmup=3, lr_schedule="constant"),
}
EVAL_SPLITS = {"distill": "dev", "rl": "dev,test", "eval": "test,hard"}  # what each stage evaluates unless --eval-splits
PRETRAINED_LR = {"distill": 1e-5, "rl": 1e-6}  # distill from a checkpoint --init, rl on --data (choice 4)
SCRATCH_SHAPES = {"tiny": lambda vocab: M.tiny_config(vocab, max_position_embeddings=1024),
                  "qwen2.5-0.5b": lambda vocab: M.qwen25_05b_config(), "qwen2.5-1.5b": lambda vocab: M.qwen25_15b_config()}


def ranged(kind, low, high=math.inf, above=False):
    """An argparse type: a number >= low (> low with above=True) and <= high; argparse names the flag in its error."""
    def parse(text):
        x = kind(text)
        if not (x > low if above else x >= low) or x > high:
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low}{f' and <= {high}' if high < math.inf else ''} (got {text})")
        return x
    parse.__name__ = kind.__name__  # argparse's message for a non-number: "invalid int value: 'x'"
    return parse


count, share, positive, nonneg = ranged(int, 1), ranged(float, 0, 1), ranged(float, 0, above=True), ranged(float, 0)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit code 1 (not usage + traceback-like text)."""

    def error(self, message):
        sys.exit(f"error: {message}")


def parser(stage=None, pretrained=False):
    """train.py's flags with `stage`'s defaults (pretrained: a lower lr). ablate.py reads the groups."""
    d = {**dict.fromkeys(STAGE_DEFAULTS["rl"]), **STAGE_DEFAULTS.get(stage, {})}
    d["lr"] = PRETRAINED_LR[stage] if pretrained else d["lr"]
    each = lambda k: ", ".join(f"{s} {v[k]}" for s, v in STAGE_DEFAULTS.items() if v[k])
    ap = Parser(description="ReaLM: distill, RL-train and evaluate a small model (--stage ablate: see ablate.py).", allow_abbrev=False)
    g = ap.add_argument_group("run")
    g.add_argument("--stage", choices=["distill", "rl", "eval", "ablate"], required=True, help="what to run")
    g.add_argument("--out", help="run folder (default out/<stage>; eval: the --init folder)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, routes and initialisation")
    g.add_argument("--resume", action="store_true", help="rl: continue the run in --out from its trainer_state.pt, with its flags")
    g.add_argument("--save-every", type=ranged(int, 0), default=50, help="rl: save a checkpoint every k steps (0: only at the end)")
    g.add_argument("--max-bad-steps", type=count, default=3, help="rl: stop after this many non-finite steps in a row")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument("--micro-tokens", type=count, default=4096, help="gradient accumulation: micro-batches of at most this many padded tokens")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in the backward (less memory)")
    g.add_argument("--compile", action="store_true", help="rl: decode through torch.compile (+ a CUDA graph on CUDA)")
    g = ap.add_argument_group("model and data")
    g.add_argument("--init", default=d["init"], help="start: 'scratch' (a random-weight model of --scratch-shape) or a "
                   f"Hugging Face folder (default: {each('init')}; rl runs the distill stage first when it is missing)")
    g.add_argument("--scratch-shape", default="tiny", choices=SCRATCH_SHAPES, help="the shape of --init scratch")
    g.add_argument("--data", help="JSONL problems with teacher routes (default: the embedded domain)")
    g.add_argument("--route-rule", default="deliver", choices=D.ROUTE_RULES, help="embedded domain: the rule only "
                   "routes carry (deliver: R5, a delivery adds 1, never written by the distillation, in half of the "
                   "RL, dev, test and hard problems; deliver3: R5 adds 3; none: four rules, all taught)")
    g.add_argument("--eval-data", help="JSONL problems to evaluate on, with --data (default: none)")
    g = ap.add_argument_group("distillation and routes")
    g.add_argument("--budget", type=ranged(int, 0), default=3000, help="teacher-written problems for SFT (embedded domain)")
    g.add_argument("--unguided", action="store_true", help="distil from the teacher WITHOUT the rules (the baseline)")
    g.add_argument("--batch-size", type=count, default=32, help="SFT problem examples per optimizer step (+ --drills verdict drills)")
    g.add_argument("--R", type=count, default=3, help="positive and negative routes per problem in the route bank, each")
    g.add_argument("--diverse-routes", action=argparse.BooleanOptionalAction, default=False, help="embedded teacher: right routes write sums in either order")
    g.add_argument("--mrpv-share", type=share, default=0.3, help="share of SFT examples in the MRPV format, from --mrpv-from on")
    g.add_argument("--mrpv-from", type=share, default=0.0, help="share of SFT steps before MRPV examples join (alone "
                   "until then; 0: from the first step)")
    g.add_argument("--reading", type=share, default=0.5, help="embedded domain, a --route-rule, guided: share of MRPV "
                   "examples that are reading drills (distill.reading_set: worlds where only the routes say what a "
                   "delivery or an order adds; 0: none)")
    g.add_argument("--order-drills", type=share, default=0.5, help="share of reading drills that order instead of "
                   "deliver (an event kind of the drills alone, adding 1 to 12 units as only their routes say)")
    g.add_argument("--rule-drills", type=share, default=0.0, help="share of the other reading drills in the route "
                   "rule's own world, so that the distillation writes R5 on deliveries (0: never; 0.1: as often as "
                   "each other amount)")
    g.add_argument("--drills", type=ranged(int, 0), default=32, help="embedded domain, --restate: verdict drills added to each SFT batch (distill.verdict_drills; 0: none)")
    g.add_argument("--sft-eaai", action=argparse.BooleanOptionalAction, default=False, help="MRPV SFT examples show 1..K routes, partly")
    g.add_argument("--K", type=count, default=3, help="routes shown in an MRPV prompt")
    g.add_argument("--neg-share", type=share, default=0.5, help="expected share of wrong routes among those shown")
    g.add_argument("--order", default="solve-verify", choices=mrpv.ORDERS, help="MRPV response: own steps and answer first, or verdicts first")
    g.add_argument("--route-answers", action=argparse.BooleanOptionalAction, default=True, help="show each route's answer line")
    g.add_argument("--question-last", action=argparse.BooleanOptionalAction, default=True, help="MRPV prompt: the routes, then the question")
    g.add_argument("--restate", action=argparse.BooleanOptionalAction, default=True, help="route headers name their result and verdict lines restate the comparison ('Route 2 : 8 < 13 -> wrong ...')")
    g.add_argument("--keep-errors", action=argparse.BooleanOptionalAction, default=False, help="a wrong route shown in part keeps its error")
    g = ap.add_argument_group("rl")  # GRPO; flag names follow TRL's where one exists
    g.add_argument("--num-generations", type=count, default=8, help="samples per prompt (the group; at least 2 for grpo)")
    g.add_argument("--prompts-per-step", type=count, default=8, help="prompts per optimizer step")
    g.add_argument("--temperature", type=positive, default=0.7, help="sampling temperature, > 0 (the loss uses the same)")
    g.add_argument("--epsilon", type=share, default=0.2, help="PPO clip: ratio kept above 1 - epsilon")
    g.add_argument("--epsilon-high", type=nonneg, default=None, help="PPO clip: ratio kept below 1 + epsilon_high (default epsilon)")
    g.add_argument("--beta", type=nonneg, default=0.0, help="k3 KL coefficient to the frozen start (0: no reference model is loaded)")
    g.add_argument("--loss-type", default="token", choices=["token", "sequence"], help="token mean over the batch, or per-sequence mean then batch mean")
    g.add_argument("--scale-rewards", action=argparse.BooleanOptionalAction, default=True, help="divide advantages by the group's std (--no-scale-rewards: Dr. GRPO)")
    g.add_argument("--advantages", default="component", choices=["sample", "component"], help="one per sample, or per reward component and token (grpo.py)")
    g.add_argument("--mu", type=count, default=1, help="PPO epochs over each batch of samples (1 with one minibatch: exactly on-policy)")
    g.add_argument("--num-minibatches", type=count, default=1, help="optimizer steps per epoch, each over a share of the groups")
    g.add_argument("--algo", default="grpo", choices=["grpo", "rft"], help="grpo, or rft: fine-tune on the policy's own right answers")
    g.add_argument("--routes", default="mrpv", choices=["mrpv", "none"], help="show external routes (MRPV) or never (plain GRPO)")
    g.add_argument("--fresh-problems", action=argparse.BooleanOptionalAction, default=False, help="draw from --budget problems the distillation never saw")
    g.add_argument("--no-anneal", action="store_true", help="routes at full signal all along (CoT-Synthesizer style)")
    g.add_argument("--reward", default="mrpv", choices=["mrpv", "answer", "steps"], help="mrpv: answer + verdicts + step + format; "
                   "answer: answer + format; steps: mrpv + credit per line of its own chain matching a right route (our addition)")
    g.add_argument("--w-verdict", type=nonneg, default=0.5, help="weight of the verdict reward")
    g.add_argument("--w-step", type=nonneg, default=0.5, help="weight of the first-wrong-step reward (0: off)")
    g.add_argument("--w-format", type=nonneg, default=0.1, help="weight of the format reward")
    g.add_argument("--verdict-gate", action=argparse.BooleanOptionalAction, default=False, help="no verdict on a shown route: reward 0")
    g.add_argument("--consistent", action=argparse.BooleanOptionalAction, default=True, help="verdict credit only when it agrees with the own answer")
    g.add_argument("--eaai-shape", default="cosine", choices=eaai.SHAPES, help="shape of the EAAI decay")
    g.add_argument("--eaai-hold", type=share, default=0.0, help="share of steps at full signal before the decay")
    g.add_argument("--eaai-decay", type=share, default=0.6, help="share of steps over which the signal decays to 0")
    g.add_argument("--eaai-partial", action=argparse.BooleanOptionalAction, default=True, help="as h decays, show a prefix of each route (else whole)")
    g.add_argument("--eaai-fade", default="together", choices=eaai.FADES, help="show, count and prefix fade together, or one after another")
    g = ap.add_argument_group("optimization")
    g.add_argument("--steps", type=count, default=d["steps"], help=f"optimizer steps (default: {each('steps')})")
    g.add_argument("--lr", type=positive, default=d["lr"], help=f"peak learning rate (default: {each('lr')}; from a "
                   f"checkpoint: distill {PRETRAINED_LR['distill']}, rl on --data {PRETRAINED_LR['rl']})")
    g.add_argument("--lr-schedule", default=d["lr_schedule"], choices=["cosine", "constant"], help=f"after the warm-up (default: {each('lr_schedule')})")
    g.add_argument("--warmup", type=ranged(int, 0), default=d["warmup"], help=f"warm-up steps (default: {each('warmup')})")
    g.add_argument("--weight-decay", type=nonneg, default=0.1, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=nonneg, default=1.0, help="clip the gradient norm to this (0: off)")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=ranged(int, 0), default=0, help="evaluate every k steps (0: only at the end)")
    g.add_argument("--eval-n", type=ranged(int, 0), default=None, help=f"problems per evaluation split (default {D.EVAL_SIZES}; 0: none)")
    g.add_argument("--max-new-tokens", type=count, default=160, help="tokens generated per answer at most")
    g.add_argument("--eval-splits", default=None, help="embedded splits evaluated, of dev, test, hard (default: distill "
                   f"{EVAL_SPLITS['distill']}, rl {EVAL_SPLITS['rl']}, eval {EVAL_SPLITS['eval']}; choose settings on dev)")
    g.add_argument("--show", type=ranged(int, 0), default=0, help="eval: instead of scoring, print the first N problems of the "
                   "first split with the routes shown, the model's response and what is right (0: off)")
    return ap


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--stage", "--init", "--data"):
        pre.add_argument(flag)
    pre = pre.parse_known_args(argv)[0]  # the stage and the start choose the defaults (choice 4)
    pretrained = (pre.stage == "distill" and pre.init not in (None, "scratch")) or (pre.stage == "rl" and pre.data)
    args = parser(pre.stage, pretrained).parse_args(argv)
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    args.eval_splits = EVAL_SPLITS.get(args.stage, "test,hard") if args.eval_splits is None else args.eval_splits
    check_args(args)
    return args


def check_args(a):
    """What one flag's type cannot check: flags against each other, the splits, the device. One line each."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    checks = [
        (a.num_generations < 2 and a.algo == "grpo", "num_generations", "must be >= 2 for grpo (a group of 1 has zero advantage)"),
        (a.prompts_per_step % world, "prompts_per_step", f"is not a multiple of the {world} processes"),
        (a.num_minibatches > a.prompts_per_step, "num_minibatches", "must be at most --prompts-per-step"),
        (a.fresh_problems and a.data, "fresh_problems", "is for the embedded domain, not --data"),
        (a.eaai_hold + a.eaai_decay > 1, "eaai_decay", "plus --eaai-hold must be at most 1 (both are shares of the steps)"),
    ]
    for bad, name, what in checks:
        if bad:
            raise D.DataError(f"--{name.replace('_', '-')} {what} (got {getattr(a, name)})")
    D.eval_splits(a.eval_splits)
    try:
        pick_device(a.device)
    except RuntimeError:
        raise D.DataError(f"--device {a.device!r} is not a device (auto, cpu, cuda, cuda:N)") from None


# ---- set-up ----

def pick_device(name):
    return M.default_device() if name == "auto" else torch.device(name)


def load_student(args, device):
    """A random-weight model of --scratch-shape with the domain's tokenizer, or a checkpoint folder (fp32 for training)."""
    if args.init == "scratch":
        tok = D.tokenizer()
        torch.manual_seed(args.seed)
        return M.Transformer(SCRATCH_SHAPES[args.scratch_shape](tok.vocab_size)).to(device), tok
    return M.load_model(args.init, device, torch.float32), M.load_tokenizer(args.init)


def train_set(args):
    """Problems with their route banks: the routes of a JSONL file, or the embedded domain's teacher."""
    if args.data:
        return distill.jsonl_set(args.data)
    n = args.budget * (2 if args.route_rule != "none" else 1)  # the distillation's taught half, as many route-only
    return distill.embedded_set("train", n, args.R, args.seed, args.seed, not args.unguided, args.diverse_routes, args.route_rule)


def eval_sets(args, splits):
    """{split: (problems, banks)}: the --eval-data file; none for --data without one; else the embedded splits (fixed seeds)."""
    if args.eval_data:
        return {"eval": distill.jsonl_set(args.eval_data)}
    if args.data or args.eval_n == 0:
        return {}
    return {s: distill.embedded_set(s, D.EVAL_SIZES[s] if args.eval_n is None else args.eval_n, args.R, 0, 1000, True,
                                    args.diverse_routes, args.route_rule) for s in splits}


# ---- evaluation ----

def layout_of(args):  # the MRPV prompt and response layout the flags ask for
    return mrpv.Layout(args.order, args.route_answers, args.question_last, args.restate)


def completions(model, tok, problems, routes, max_new_tokens, layout=mrpv.Layout()):
    """The greedy completion of each problem's prompt showing `routes[i]` (empty: autonomous)."""
    prompts = [distill.encode_prompt(tok, mrpv.build_prompt(p, r, layout)) for p, r in zip(problems, routes)]
    return [tok.decode(o) for o in greedy(model, prompts, max_new_tokens, tok.eos_ids, tok.pad_id)]


def eval_routes(banks, args):
    """The routes evaluation shows problem i: K drawn from its bank, seeded by i alone (choice 3)."""
    return [mrpv.select_routes(b, args.K, args.neg_share, random.Random(f"eval-{i}")) for i, b in enumerate(banks)]


def evaluate(model, tok, problems, banks, args):
    """acc_autonomous (no routes), acc_with_routes (K routes from the bank, seeded per problem; choice 3), each
    problem's 0 / 1 (right_*, for paired comparisons), verdict_acc (share of shown routes judged right), split by
    whether the answer with routes is right (verdict_acc_own_right / _own_wrong), and step_acc (share of shown
    wrong routes whose first wrong step is named). On the embedded domain also per part, taught and route-only
    (domain.py choice 5): n_<part>, acc_autonomous_<part>, acc_with_routes_<part>, verdict_acc_<part>."""
    shown = eval_routes(banks, args)
    routes = {"autonomous": [[]] * len(problems), "with_routes": shown}
    texts = {k: completions(model, tok, problems, r, args.max_new_tokens, layout_of(args)) for k, r in routes.items()}
    right = {k: [D.check(mrpv.answer_of(t, bool(args.data)), p.answer) for t, p in zip(ts, problems)] for k, ts in texts.items()}  # --data: free-form
    judged = [mrpv.judged(mrpv.parse(t), r) for t, r in zip(texts["with_routes"], shown)]  # per problem, per route
    share = lambda xs: sum(xs) / len(xs) if xs else None
    verdicts = lambda keep: share([v for j, ok in zip(judged, keep) if ok for v, _ in j])
    everything = [True] * len(problems)
    out = {**{f"acc_{k}": share(r) or 0.0 for k, r in right.items()}, "verdict_acc": verdicts(everything),
           "verdict_acc_own_right": verdicts(right["with_routes"]), "verdict_acc_own_wrong": verdicts([not r for r in right["with_routes"]]),
           "step_acc": share([s for j in judged for _, s in j if s is not None])}
    route_only = [D.route_only(p) for p in problems]
    if None not in route_only:  # the embedded domain: taught and route-only parts
        out["route_only"] = "".join("01"[x] for x in route_only)  # each problem's part, for paired comparisons by part
        for part, keep in (("taught", [not r for r in route_only]), ("route_only", route_only)):
            out[f"n_{part}"] = sum(keep)
            out.update({f"acc_{k}_{part}": share([x for x, ok in zip(r, keep) if ok]) for k, r in right.items()})
            out[f"verdict_acc_{part}"] = verdicts(keep)
        alone = prior_samples(model, tok, [p for p, r in zip(problems, route_only) if r], args.max_new_tokens)
        out["rule_prior"], out["rule_prior_lines"] = D.rule_prior(alone)  # R5 in the student's own samples
    return {**out, **{f"right_{k}": "".join("01"[x] for x in r) for k, r in right.items()}}


PRIOR_SAMPLES, PRIOR_TEMPERATURE = 4, 0.7  # the rule's prior: samples per route-only problem, at RL's temperature


def prior_samples(model, tok, problems, max_new_tokens, seed=0):
    """PRIOR_SAMPLES samples at PRIOR_TEMPERATURE of each problem's autonomous prompt -> [(problem, text)]: what the
    policy writes alone, from which plain GRPO's exploration starts (domain.rule_prior)."""
    prompts = [distill.encode_prompt(tok, mrpv.build_prompt(p, [])) for p in problems]
    samples = generate(model, prompts, n=PRIOR_SAMPLES, max_new_tokens=max_new_tokens, temperature=PRIOR_TEMPERATURE,
                       eos_ids=tok.eos_ids, seed=seed, pad_id=tok.pad_id) if prompts else []
    return [(problems[s.prompt_index], tok.decode(s.tokens)) for s in samples]


def show(model, tok, problems, banks, args, split):
    """--show N: the first N problems of a split, each with the routes evaluate() shows it (the same draw), the
    model's greedy response with them, and what is right: the answer, and per route its verdict and first wrong step."""
    n = min(args.show, len(problems))
    shown = eval_routes(banks[:n], args)
    texts = completions(model, tok, problems[:n], shown, args.max_new_tokens, layout_of(args))
    verdict = lambda v: "no verdict" if v == "missing" else "sound" if v is None else f"wrong at step {v}" if v else "wrong"
    for i, (p, routes, text) in enumerate(zip(problems, shown, texts)):
        parsed, part = mrpv.parse(text), {None: "", True: ", route-only", False: ", taught"}[D.route_only(p)]
        right = D.check(mrpv.answer_of(text, bool(args.data), parsed), p.answer)
        print(f"\n=== {split} problem {i}{part}: the prompt\n{mrpv.build_prompt(p, routes, layout_of(args))}"
              f"=== the response\n{text}\n=== what is right\nanswer {p.answer}: it says {parsed.answer} ({'right' if right else 'wrong'})")
        for k, (r, (ok, step_ok)) in enumerate(zip(routes, mrpv.judged(parsed, routes)), 1):
            truth, said = "sound" if r.correct else verdict(r.first_wrong or 0), verdict(parsed.verdicts.get(k, "missing"))
            step = "" if step_ok is None or not ok else f", the step {'right' if step_ok else 'wrong'}"
            print(f"route {k}: {truth}; it says {said} (verdict {'right' if ok else 'wrong'}{step})")


def evaluate_and_log(model, tok, evals, args, path, step, **extra):
    """Evaluate on each split, append a line per split to `path`, print the figures."""
    for split, (ps, bs) in evals.items():
        acc = evaluate(model, tok, ps, bs, args)
        log(path, step=step, split=split, n=len(ps), **acc, **extra)  # acc: both accuracies and per-problem bits
        figure = lambda key: "-" if acc.get(key) is None else f"{acc[key]:.3f}"
        parts = "".join(f"; {part} ({acc[f'n_{part}']}): alone {figure(f'acc_autonomous_{part}')} with routes "
                        f"{figure(f'acc_with_routes_{part}')} verdicts {figure(f'verdict_acc_{part}')}"
                        for part in ("taught", "route_only") if acc.get(f"n_{part}"))
        tqdm.write(f"{'' if step is None else f'step {step} '}{split} ({len(ps)} problems): acc_autonomous {figure('acc_autonomous')} "
                   f"acc_with_routes {figure('acc_with_routes')} verdict_acc {figure('verdict_acc')}{parts}")


# ---- checkpoints and metrics ----

def log(path: Path, **row):
    """Append one JSON object as a line (metrics.jsonl, eval.jsonl); a non-finite float is written as null (choice 6)."""
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    with open(path, "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")


RUN_FILES = ("metrics.jsonl", "routes.jsonl", "eval.jsonl")  # a run folder's own files, kept across saves


def fresh_run_folder(out: Path):
    """Empty the run folder for a new run; refuse a folder that is not one of ours."""
    if out.exists() and any(out.iterdir()):
        if not any((out / f).exists() for f in ("config.json", "metrics.jsonl", "ablate.json")):
            raise D.DataError(f"--out {out} exists and is not a run folder (no config.json, metrics.jsonl or ablate.json)")
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


def drills(args):  # verdict drills a batch: on the embedded domain, in the restated layout (distill.py choice 4)
    return args.drills if args.restate and not args.data else 0


def run_distill(args):
    device = pick_device(args.device)
    out = Path(args.out or "out/distill")
    model, tok = load_student(args, device)
    problems, banks = train_set(args)  # the route bank: every problem
    taught = [i for i, p in enumerate(problems) if not D.route_only(p)]  # what the distillation teaches (domain.py choice 5)
    rng = random.Random(args.seed)
    alone, routed = (distill.sft_examples([problems[i] for i in taught], [banks[i] for i in taught], tok, s, args.K, args.neg_share,
                                          rng, args.sft_eaai, layout_of(args), args.keep_errors) for s in (0.0, 1.0))  # both ways
    if not alone:
        raise D.DataError("no SFT example: no problem has a positive (correct) route")
    if reads(args):  # reading drills in place of a share of the MRPV examples (distill.py choice 5)
        worlds = distill.reading_set(len(routed), args.R, args.seed, args.route_rule, args.rule_drills,
                                     args.order_drills)
        reading = distill.sft_examples(*worlds, tok, 1.0, args.K, args.neg_share, rng,
                                       args.sft_eaai, layout_of(args), args.keep_errors)
        routed = [reading[i % len(reading)] if rng.random() < args.reading else r for i, r in enumerate(routed)]
    if not args.data:  # what guidance buys: the embedded teacher without the rules
        print(f"without the rules the teacher is right on {sum(D.teacher_route(p, False).correct for p in problems) / len(problems):.1%}")
    evals = eval_sets(args, D.eval_splits(args.eval_splits))  # settings are chosen on dev; the eval stage gives test and hard
    print(f"distill: {'UNGUIDED' if args.unguided else 'guided'} teacher right on {distill.teacher_accuracy(banks):.1%} of "
          f"{len(problems)} problems; SFT on the {len(taught)} taught -> SFT examples ({args.mrpv_share:.0%} MRPV from step {round(args.mrpv_from * args.steps)}"
          f"{f', {args.reading:.0%} of them reading drills' if reads(args) else ''}, + {drills(args)} verdict drills a batch); "
          f"student {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {device}; writing {out}/", flush=True)
    fresh_run_folder(out)
    metrics = out / "metrics.jsonl"
    D.save_jsonl([D.Problem(p.question, p.answer, p.rules, b) for p, b in zip(problems, banks)], out / "routes.jsonl")
    opt = make_optimizer(model, args)
    autocast = grpo.autocast_for(device)
    model.train()
    bar, t0 = tqdm(range(args.steps), desc="distill", dynamic_ncols=True), time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        mix = args.mrpv_share if step >= args.mrpv_from * args.steps else 0.0  # from --mrpv-from on (choice 2: 0)
        batch = distill.draw_batch(alone, routed, mix, args.batch_size, rng) + distill.verdict_drills(drills(args), args.K, rng, tok)
        loss_sum = distill.sft_step(model, batch, tok.pad_id, args.micro_tokens, autocast)
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
    print(f"distill: {args.steps} steps in {time.time() - t0:.0f} s; wrote {out}/ (model, tokenizer, trainer_state.pt, metrics, routes)")


# ---- the RL stage ----

class TrainingError(Exception):
    pass


@dataclass
class RLRun:
    """What an RL run carries from step to step."""
    model: M.Transformer  # the policy, float32, trained
    sampler: M.Transformer  # samples and evaluates: the model itself, on CUDA a bfloat16 copy (choice 4)
    ref: M.Transformer | None  # the frozen start for the k3 KL term; None (not loaded) when --beta is 0
    tok: M.Tokenizer
    problems: list  # domain.Problem
    banks: list  # per problem, its teacher routes (domain.Route), right and wrong
    annealer: eaai.Annealer  # how much external signal each prompt gets at a step
    weights: mrpv.Weights
    opt: torch.optim.Optimizer
    rng: random.Random  # the problems drawn each step and the routes shown
    evals: dict  # {split: (problems, banks)}, rank 0 only
    start: int = 0  # the first step to run (after --resume, the saved step)


def rl_start(args, device):
    """The policy and its problems with route banks. On the embedded default the start is out/distill,
    made first when missing; the bank is the distill run's routes.jsonl (twice the teacher's budget with
    --route-rule deliver: the taught problems the distillation saw and as many route-only ones)."""
    if args.init == "out/distill" and not args.data and not Path("out/distill/config.json").is_file():
        print("rl: no out/distill/ yet: running the distill stage first (python train.py --stage distill)", flush=True)
        run_distill(get_args(["--stage", "distill", "--device", args.device, "--seed", str(args.seed), "--route-rule", args.route_rule]))
    model, tok = load_student(args, device)
    if args.fresh_problems:  # problems the distillation never saw, routes from the same teacher (a larger budget)
        return model, tok, *distill.embedded_set("fresh", args.budget, args.R, args.seed, args.seed, not args.unguided,
                                                 args.diverse_routes, args.route_rule)
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
    if rank == 0:
        rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= state["step"]]
        (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    defaults = vars(get_args(["--stage", "rl"]))  # flags added since the run was saved take their defaults, except
    before = dict(order="verify-solve", question_last=False, advantages="sample", consistent=False,  # what runs did before them
                  restate=False, route_rule="none")
    return state, argparse.Namespace(**{**defaults, **before, **state["args"], "resume": True, "device": args.device, "out": str(out)})


def rl_setup(args, out, state, rank, device) -> RLRun:
    model, tok, problems, banks = rl_start(args, device)
    model.grad_checkpointing = args.grad_checkpointing
    ref = copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 else None
    if state:
        model.load_state_dict(M.load_model(out, device, torch.float32).state_dict())
    sampler = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False) if device.type == "cuda" else model
    hold = args.steps if args.no_anneal else round(args.eaai_hold * args.steps)
    schedule = eaai.Schedule(args.eaai_shape, hold, round(args.eaai_decay * args.steps))
    annealer = eaai.Annealer(schedule, args.K if args.routes == "mrpv" else 0, args.seed, vary_length=args.eaai_partial, fade=args.eaai_fade)
    answer_only = args.reward == "answer"
    weights = mrpv.Weights(verdict=0.0 if answer_only else args.w_verdict, step=0.0 if answer_only else args.w_step,
                           format=args.w_format, chain=1.0 if args.reward == "steps" else 0.0, gate=args.verdict_gate, consistent=args.consistent)
    evals = eval_sets(args, D.eval_splits(args.eval_splits)) if rank == 0 else {}
    run = RLRun(model, sampler, ref, tok, problems, banks, annealer, weights, make_optimizer(model, args),
                random.Random(args.seed), evals)
    if state:
        if [len(g["params"]) for g in state["optimizer"]["param_groups"]] != [len(g["params"]) for g in run.opt.param_groups]:
            raise D.DataError(f"--resume: {out / 'trainer_state.pt'} holds the optimizer of an earlier version's model (q, k, v "
                              "and gate, up as separate matrices, model.py choice 5): resume it with that version, or start again")
        run.opt.load_state_dict(state["optimizer"])
        annealer.load_state_dict(state["eaai"])
        run.rng.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        run.start = state["step"]
    return run


def rl_prompts(step, run: RLRun, args):
    """The step's global batch: --prompts-per-step problems, each with the routes EAAI lets it show.
    Every process draws the same batch (same seeds) and then keeps its own share."""
    idx = [run.rng.randrange(len(run.problems)) for _ in range(args.prompts_per_step)]
    hints = [run.annealer.hint(step) for _ in idx]
    shown = [[mrpv.show(r, h.frac, args.keep_errors) for r in mrpv.select_routes(run.banks[i], h.k, args.neg_share, run.rng)] if h.show else []
             for i, h in zip(idx, hints)]
    return idx, shown


def score(run: RLRun, samples, prompts, picked, shown, groups, args):
    """MRPV rewards and the update's batch: (prompt, completion, old log-probs, advantage, group) per sample.
    picked[j], shown[j], groups[j]: the problem, the routes shown and the global group of local prompt j."""
    rewards = []
    for s in samples:
        i, routes = picked[s.prompt_index], shown[s.prompt_index]
        reference = next((r.text for r in run.banks[i] if r.correct), None)  # a right route, for --reward steps
        rewards.append(mrpv.reward(run.tok.decode(s.tokens), run.problems[i], routes, run.weights, reference,
                                   free_form=bool(args.data), layout=layout_of(args)))
    if args.algo == "rft":  # fine-tune on the policy's own right answers: advantage 1 each, the rest dropped
        adv = [1.0 if r.answer == 1 else None for r in rewards]
    elif args.advantages == "component":  # per component, per token (grpo.py choice 5)
        on_verdict = [mrpv.on_verdict_lines([run.tok.decode([t]) for t in s.tokens]) for s in samples]
        w = {c: getattr(run.weights, c) for c in mrpv.PARTS}  # each component's weight
        adv = grpo.per_token_advantages(rewards, w, on_verdict, args.num_generations, args.scale_rewards)
    else:
        adv = grpo.group_advantages(torch.tensor([r.total for r in rewards]), args.num_generations, args.scale_rewards).tolist()
    batch = [(prompts[s.prompt_index], s.tokens, s.logprobs, a, groups[s.prompt_index])
             for s, a in zip(samples, adv) if a is not None]
    return rewards, batch


def rl_row(step, run: RLRun, rewards, samples, batch, loss, stats, bad, t, args, world, device):
    """The step's metrics.jsonl line, over every process's samples; t: the clock at the step's phase boundaries."""
    rows = grpo.gather([(r.total, r.answer, r.verdict, r.step, r.format, r.chain, len(s.tokens), sum(s.logprobs))
                   for r, s in zip(rewards, samples)], world)
    col = lambda j: [row[j] for row in rows if row[j] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    n_tokens = sum(col(6))
    trained = grpo.sum_floats([sum(len(e[0]) + len(e[1]) for e in batch)], world, device)[0] * args.mu
    return dict(stage="rl", step=step + 1, loss=loss, reward=mean(col(0)), hint=run.annealer.schedule.h(step),
                **{f"reward_{k}": mean(col(j)) for j, k in enumerate(("answer", "verdict", "step", "format", "chain"), 1)},
                response_len=n_tokens / len(rows), entropy=-sum(col(7)) / max(1, n_tokens),  # sampled-token estimate
                zero_adv_groups=float((torch.tensor(col(0)).view(-1, args.num_generations).std(1) == 0).float().mean()),
                skipped_updates=bad, lr=run.opt.param_groups[0]["lr"], **stats, step_s=round(time.perf_counter() - t[0], 3),
                time_rollout=t[1] - t[0], time_reward=t[2] - t[1], time_backward=t[3] - t[2] - stats["time_optimizer"],
                sampled_tokens=n_tokens, trained_tokens=trained, peak_gib=M.peak_memory_gib(device))


@torch.no_grad()
def copy_weights(dst: M.Transformer, src: M.Transformer):
    """dst's parameters take src's values (cast to dst's dtype), tensor by tensor: no state_dict round trip,
    which would split and re-stack the stacked matrices (model.py choice 5) in a transient float32 copy."""
    for d, s in zip(dst.parameters(), src.parameters(), strict=True):
        d.copy_(s)


def save_rl(run: RLRun, args, out, step, rank, world):
    if rank == 0:
        save_run(run.model, run.tok, out, {"stage": "rl", "step": step, "optimizer": run.opt.state_dict(), "args": vars(args),
                                           "eaai": run.annealer.state_dict(),
                                           "rng": {"python": run.rng.getstate(), "torch": torch.get_rng_state()}})
    if world > 1:
        dist.barrier()


def run_rl(args):
    rank, world, device = grpo.dist_setup(pick_device(args.device))
    out = Path(args.out or "out/rl")
    state, args = rl_resume(args, out, rank) if args.resume else (None, args)
    run = rl_setup(args, out, state, rank, device)
    metrics, G = out / "metrics.jsonl", args.num_generations
    if rank == 0:
        print(f"rl: {args.algo} {args.init} -> {out}/ on {device}{f' x {world} processes' if world > 1 else ''}; "
              f"{len(run.problems)} problems with route banks; {args.steps} steps of {args.prompts_per_step} prompts x {G} "
              f"samples; routes {args.routes}{', no anneal' if args.no_anneal else ''}; reward {args.reward}"
              f"{f'; resuming after step {run.start}' if run.start else ''}", flush=True)
    if rank == 0 and not state:
        fresh_run_folder(out)
        evaluate_and_log(run.sampler, run.tok, run.evals, args, metrics, 0)
    if world > 1:
        dist.barrier()
    t0, bad_run, last_save = time.time(), 0, run.start
    bar = tqdm(range(run.start, args.steps), desc="rl", dynamic_ncols=True, disable=rank != 0, initial=run.start, total=args.steps)
    for step in bar:
        t = [grpo.clock(device)]  # phase boundaries
        M.peak_memory_reset(device)
        for g in run.opt.param_groups:
            g["lr"] = lr_at(step, args)
        # 1. the step's prompts, each with the routes EAAI lets it show; this process samples groups `mine`
        idx, shown = rl_prompts(step, run, args)
        mine = list(range(rank, len(idx), world))
        prompts = [distill.encode_prompt(run.tok, mrpv.build_prompt(run.problems[idx[g]], shown[g], layout_of(args))) for g in mine]
        # 2. n samples per prompt with the sampler's log-probs (seeds per prompt: independent of the split, choice 5)
        run.sampler.eval()
        samples = generate(run.sampler, prompts, n=G, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           eos_ids=run.tok.eos_ids, seed=[(args.seed * 100_003 + step) * 1_000 + g for g in mine],
                           pad_id=run.tok.pad_id, compile=args.compile)
        run.model.train()
        t.append(grpo.clock(device))
        # 3. rewards and 4. group-relative advantages (a group lives on one process)
        rewards, batch = score(run, samples, prompts, [idx[g] for g in mine], [shown[g] for g in mine], mine, args)
        t.append(grpo.clock(device))
        # 5. the PPO-clip update (grpo.py)
        loss, stats, bad = grpo.policy_update(run.model, run.ref, run.opt, batch, args, world, run.tok.pad_id)
        if run.sampler is not run.model:  # CUDA: the bf16 sampler gets the new weights
            copy_weights(run.sampler, run.model)
        t.append(grpo.clock(device))
        # 6. log, evaluate, save
        bad_run = bad_run + 1 if bad else 0
        row = rl_row(step, run, rewards, samples, batch, loss, stats, bad, t, args, world, device)
        if rank == 0:
            log(metrics, **row, autonomous=not any(shown))  # no route in any prompt of the step
        bar.set_postfix(reward=f"{row['reward']:.2f}", answer=f"{row['reward_answer']:.2f}", h=f"{row['hint']:.2f}")
        if bad_run >= args.max_bad_steps:
            where = f"{out}/ holds the last good checkpoint (step {last_save})" if last_save else "no checkpoint was written"
            raise TrainingError(f"loss or gradient not finite in {bad_run} steps in a row (to step {step + 1}): stopped; {where}")
        if rank == 0 and eval_due(step + 1, args):
            evaluate_and_log(run.sampler, run.tok, run.evals, args, metrics, step + 1)
        if not bad and (step + 1 == args.steps or (args.save_every and (step + 1) % args.save_every == 0)):
            save_rl(run, args, out, step + 1, rank, world)
            last_save = step + 1
    if rank == 0:
        print(f"rl: steps {run.start + 1}..{args.steps} in {time.time() - t0:.0f} s; wrote {out}/")
    if world > 1:
        dist.destroy_process_group()


# ---- the eval stage ----

def run_eval(args):
    if args.init is None:
        raise D.DataError("--stage eval needs --init DIR (a checkpoint folder, e.g. out/distill)")
    device = pick_device(args.device)
    model, tok = M.load_model(args.init, device), M.load_tokenizer(args.init)
    sets = eval_sets(args, D.eval_splits(args.eval_splits))
    if not sets:
        raise D.DataError("--stage eval with --data needs --eval-data FILE (the problems to evaluate on)")
    if args.show:
        split, (problems, banks) = next(iter(sets.items()))
        return show(model, tok, problems, banks, args, split)
    out = Path(args.out or args.init)
    out.mkdir(parents=True, exist_ok=True)
    print(f"eval: {args.init} on {device}; appending to {out / 'eval.jsonl'}", flush=True)
    evaluate_and_log(model, tok, sets, args, out / "eval.jsonl", None, init=args.init)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--stage=ablate" in argv or any(a == "--stage" and b == "ablate" for a, b in zip(argv, argv[1:])):
        import ablate
        return ablate.main(argv)
    try:
        args = get_args(argv)
        {"distill": run_distill, "rl": run_rl, "eval": run_eval}[args.stage](args)
    except (D.DataError, M.CheckpointError, TrainingError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
