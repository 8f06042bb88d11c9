"""train.py's command-line flags: one table, parsed by argparse, checked against each other.

    python train.py --stage rl --help      # the flags with rl's defaults

A row of FLAGS is (flag, type, default, help): the type is a checker below (count, share, ...), a tuple of
choices, bool (False: a switch; True: --x / --no-x) or int / str; STAGE as the default means the stage's own
(STAGE_DEFAULTS). ablate.py passes every flag it does not know to train.py; `in_groups` tells it which are
the arms' RL settings.

Choices that are ours:
1. Defaults depend on the stage (STAGE_DEFAULTS) and on the start: from a checkpoint the peak learning rate
   is lower (PRETRAINED_LR: distill from a checkpoint --init, rl on --data). train.py's docstring says why
   each default is what it is.
2. A bad flag is one line naming it and a non-zero exit, whether its type or its relation to another flag
   is wrong (`check`).
"""

import argparse
import math
import os
import sys

import torch

import domain as D
import eaai
import model as M
import mrpv

STAGE_DEFAULTS = {  # train.py choices 2 and 4
    "distill": dict(init="scratch", steps=1200, lr=2e-3, warmup=30, lr_schedule="cosine"),
    "rl": dict(init="out/distill", steps=120, lr=3e-5, warmup=3, lr_schedule="constant"),
}
PRETRAINED_LR = {"distill": 1e-5, "rl": 1e-6}  # choice 1
EVAL_SPLITS = {"distill": "dev", "rl": "dev,test", "eval": "test,hard"}  # what a stage evaluates unless --eval-splits
SCRATCH_SHAPES = {"tiny": lambda vocab: M.tiny_config(vocab, max_position_embeddings=1024),
                  "qwen2.5-0.5b": lambda vocab: M.qwen25_05b_config(),
                  "qwen2.5-1.5b": lambda vocab: M.qwen25_15b_config()}
STAGE = object()  # a default that is the stage's own


def ranged(kind, low, high=math.inf, above=False):
    """An argparse type: a number >= low (> low with above=True) and <= high; argparse names the flag in its error."""
    def parse(text):
        x = kind(text)
        if not (x > low if above else x >= low) or x > high:
            bound = f" and <= {high}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low}{bound} (got {text})")
        return x
    parse.__name__ = kind.__name__  # argparse's message for a non-number: "invalid int value: 'x'"
    return parse


count, natural = ranged(int, 1), ranged(int, 0)
share, positive, nonneg = ranged(float, 0, 1), ranged(float, 0, above=True), ranged(float, 0)

FLAGS = {
    "run": [
        ("--stage", ("distill", "rl", "eval"), None, "what to run (the ablation: python ablate.py)"),
        ("--out", str, None, "run folder (default out/<stage>; eval: the --init folder)"),
        ("--seed", int, 0, "seed of data order, routes and initialisation"),
        ("--resume", bool, False, "rl: continue the run in --out from its trainer_state.pt, with its flags"),
        ("--save-every", natural, 50, "rl: save a checkpoint every k steps (0: only at the end)"),
        ("--max-bad-steps", count, 3, "rl: stop after this many non-finite steps in a row"),
        ("--device", str, "auto", "auto (CUDA when present), cpu, cuda or cuda:N"),
        ("--micro-tokens", count, 4096, "gradient accumulation: micro-batches of at most this many padded tokens"),
        ("--grad-checkpointing", bool, False, "recompute each block in the backward (less memory)"),
        ("--compile", bool, False, "rl: decode through torch.compile (+ a CUDA graph on CUDA)"),
    ],
    "model and data": [
        ("--init", str, STAGE, "start: 'scratch' (a random-weight model of --scratch-shape) or a Hugging Face "
         "folder (rl runs the distill stage first when out/distill is missing)"),
        ("--scratch-shape", tuple(SCRATCH_SHAPES), "tiny", "the shape of --init scratch"),
        ("--data", str, None, "JSONL problems with teacher routes (default: the embedded domain)"),
        ("--route-rule", tuple(D.ROUTE_RULES), "deliver", "embedded domain: the rule only routes carry (deliver: R5, a "
         "delivery adds 1, never written by the distillation, in half of the RL, dev, test and hard problems; "
         "deliver3: R5 adds 3; none: four rules, all taught)"),
        ("--eval-data", str, None, "JSONL problems to evaluate on, with --data (default: none)"),
    ],
    "distillation and routes": [
        ("--budget", natural, 3000, "teacher-written problems for SFT (embedded domain)"),
        ("--unguided", bool, False, "distil from the teacher WITHOUT the rules (the baseline)"),
        ("--batch-size", count, 32, "SFT problem examples per optimizer step (+ --drills verdict drills)"),
        ("--R", count, 3, "positive and negative routes per problem in the route bank, each"),
        ("--mrpv-share", share, 0.3, "share of SFT examples in the MRPV format, from --mrpv-from on"),
        ("--mrpv-from", share, 0.0, "share of SFT steps before MRPV examples join (0: from the first step)"),
        ("--reading", share, 0.5, "embedded domain, a --route-rule, guided: share of MRPV examples that are "
         "reading drills (distill.reading_set: worlds where only the routes say what an event adds; 0: none)"),
        ("--order-drills", share, 0.5, "share of reading drills that order instead of deliver (an event kind "
         "of the drills alone, adding 1 to 12 units as only their routes say)"),
        ("--rule-drills", share, 0.0, "share of the other reading drills in the route rule's own world, so that "
         "the distillation writes R5 on deliveries (0: never; 0.1: as often as each other amount)"),
        ("--drills", natural, 32, "embedded domain: verdict drills added to each SFT batch (0: none)"),
        ("--K", count, 3, "routes shown in an MRPV prompt"),
        ("--neg-share", share, 0.5, "expected share of wrong routes among those shown"),
        ("--order", tuple(mrpv.ORDERS), "solve-verify", "MRPV response: own steps and answer first, or verdicts first"),
    ],
    "rl": [  # GRPO; flag names follow TRL's where one exists
        ("--num-generations", count, 8, "samples per prompt (the group; at least 2 for grpo)"),
        ("--prompts-per-step", count, 8, "prompts per optimizer step"),
        ("--temperature", positive, 0.7, "sampling temperature, > 0 (the loss uses the same)"),
        ("--epsilon", share, 0.2, "PPO clip: ratio kept above 1 - epsilon"),
        ("--epsilon-high", nonneg, None, "PPO clip: ratio kept below 1 + epsilon_high (default epsilon)"),
        ("--beta", nonneg, 0.0, "k3 KL coefficient to the frozen start (0: no reference model is loaded)"),
        ("--loss-type", ("token", "sequence"), "token", "token mean over the batch, or per-sequence mean then "
         "batch mean"),
        ("--scale-rewards", bool, True, "divide advantages by the group's std (--no-scale-rewards: Dr. GRPO)"),
        ("--advantages", ("sample", "component"), "component", "one per sample, or per reward component and "
         "token (grpo.py)"),
        ("--mu", count, 1, "PPO epochs over each batch of samples (1 with one minibatch: exactly on-policy)"),
        ("--num-minibatches", count, 1, "optimizer steps per epoch, each over a share of the groups"),
        ("--algo", ("grpo", "rft"), "grpo", "grpo, or rft: fine-tune on the policy's own right answers"),
        ("--routes", ("mrpv", "none"), "mrpv", "show external routes (MRPV) or never (plain GRPO)"),
        ("--no-anneal", bool, False, "routes at full signal all along (CoT-Synthesizer style)"),
        ("--reward", ("mrpv", "answer"), "mrpv", "mrpv: answer + verdicts + step + format; answer: answer + "
         "format"),
        ("--w-verdict", nonneg, 0.5, "weight of the verdict reward"),
        ("--w-step", nonneg, 0.5, "weight of the first-wrong-step reward (0: off)"),
        ("--w-format", nonneg, 0.1, "weight of the format reward"),
        ("--consistent", bool, True, "verdict credit only when it agrees with the own answer"),
        ("--eaai-shape", tuple(eaai.SHAPES), "cosine", "shape of the EAAI decay"),
        ("--eaai-hold", share, 0.0, "share of steps at full signal before the decay"),
        ("--eaai-decay", share, 0.6, "share of steps over which the signal decays to 0"),
        ("--eaai-partial", bool, True, "as h decays, show a prefix of each route (else whole)"),
    ],
    "optimization": [
        ("--steps", count, STAGE, "optimizer steps"),
        ("--lr", positive, STAGE, "peak learning rate (from a checkpoint: distill "
         f"{PRETRAINED_LR['distill']}, rl on --data {PRETRAINED_LR['rl']})"),
        ("--lr-schedule", ("cosine", "constant"), STAGE, "after the warm-up"),
        ("--warmup", natural, STAGE, "warm-up steps"),
        ("--weight-decay", nonneg, 0.1, "AdamW weight decay on matrices"),
        ("--grad-clip", nonneg, 1.0, "clip the gradient norm to this (0: off)"),
    ],
    "evaluation": [
        ("--eval-every", natural, 0, "evaluate every k steps (0: only at the end)"),
        ("--eval-n", natural, None, f"problems per evaluation split (default {D.EVAL_SIZES}; 0: none)"),
        ("--max-new-tokens", count, 160, "tokens generated per answer at most"),
        ("--eval-splits", str, None, "embedded splits evaluated, of dev, test, hard (default: "
         + ", ".join(f"{s} {v}" for s, v in EVAL_SPLITS.items()) + "; choose settings on dev)"),
        ("--show", natural, 0, "eval: instead of scoring, print the first N problems of the first split with the "
         "routes shown, the model's response and what is right (0: off)"),
    ],
}


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit code 1 (not usage + traceback-like text)."""

    def error(self, message):
        sys.exit(f"error: {message}")


def parser(stage=None, pretrained=False) -> Parser:
    """The table as an argparse parser, with `stage`'s defaults (pretrained: a lower lr, choice 1)."""
    own = {**dict.fromkeys(STAGE_DEFAULTS["rl"]), **STAGE_DEFAULTS.get(stage, {})}
    if pretrained:
        own["lr"] = PRETRAINED_LR[stage]
    each = lambda k: ", ".join(f"{s} {v[k]}" for s, v in STAGE_DEFAULTS.items())
    ap = Parser(description="ReaLM: distill, RL-train and evaluate a small model (the ablation: ablate.py).",
                allow_abbrev=False)
    for title, rows in FLAGS.items():
        group = ap.add_argument_group(title)
        for flag, kind, default, text in rows:
            key = flag[2:].replace("-", "_")
            if default is STAGE:
                default, text = own[key], f"{text} (default: {each(key)})"
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction if default else "store_true",
                                   default=default, help=text)
            elif isinstance(kind, tuple):
                group.add_argument(flag, choices=kind, default=default, help=text, required=flag == "--stage")
            else:
                group.add_argument(flag, type=kind, default=default, help=text)
    return ap


def in_groups(*titles) -> set:
    """The flags (e.g. "--lr") of the table's groups with these titles."""
    return {flag for title in titles for flag, *_ in FLAGS[title]}


def parse(argv=None) -> argparse.Namespace:
    """The flags of a train.py command line, with its stage's defaults, checked."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--stage", "--init", "--data"):
        pre.add_argument(flag)
    pre = pre.parse_known_args(argv)[0]  # the stage and the start choose the defaults (choice 1)
    pretrained = (pre.stage == "distill" and pre.init not in (None, "scratch")) or (pre.stage == "rl" and pre.data)
    args = parser(pre.stage, pretrained).parse_args(argv)
    args.epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    args.eval_splits = EVAL_SPLITS.get(args.stage, "test,hard") if args.eval_splits is None else args.eval_splits
    check(args)
    return args


def check(a):
    """What one flag's type cannot check: flags against each other, the splits, the device. One line each."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    checks = [
        (a.num_generations < 2 and a.algo == "grpo", "num_generations", "must be >= 2 for grpo (a group of 1 has "
                                                                          "zero advantage)"),
        (a.prompts_per_step % world, "prompts_per_step", f"is not a multiple of the {world} processes"),
        (a.num_minibatches > a.prompts_per_step, "num_minibatches", "must be at most --prompts-per-step"),
        (a.eaai_hold + a.eaai_decay > 1, "eaai_decay", "plus --eaai-hold must be at most 1 (both are shares of the "
                                                       "steps)"),
    ]
    for bad, name, what in checks:
        if bad:
            raise D.DataError(f"--{name.replace('_', '-')} {what} (got {getattr(a, name)})")
    D.eval_splits(a.eval_splits)
    try:
        pick_device(a.device)
    except RuntimeError:
        raise D.DataError(f"--device {a.device!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def pick_device(name) -> torch.device:
    return M.default_device() if name == "auto" else torch.device(name)
