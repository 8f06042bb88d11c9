"""The ablation: the paper's comparisons on the embedded domain, every arm from the same distilled start.

    python ablate.py --quick              # distill, grpo, cot-synth, realm; one seed -> out/ablate/results.md
    python ablate.py                      # the paper's seven arms, 5 seeds (--arms: also unguided-realm, zero)
    python ablate.py --arms grpo,realm --lr 1e-4 --eaai-decay 0.3    # any train.py flag goes to every arm
    python ablate.py --out out/ablate --resume                        # run what is missing

Every arm is a plain `train.py` command run as a subprocess (its log beside its folder), from the same
seed's distilled start with the same RL budget, then evaluated by `train.py --stage eval`; the table is
built from the eval lines. The commands are the ones a user would type, so any row can be rerun alone.
The flags below are the ablation's own; every other flag is a train.py flag, checked by train.py's
parser and passed unchanged to every arm's rl and eval commands (the arm's own flags, written after
them, win), and to the distillation too unless it belongs to train.py's rl or optimization group.

Choices that are ours:
1. Every arm gets 60 RL steps (half the rl default), to keep the table within hours on 2 CPU cores (the
   tables' times are in RESULTS.md); `--steps` changes it. The default arms are the paper's comparisons
   (DEFAULT_ARMS); unguided-realm and zero are there for --arms.
2. On a CPU two commands run at a time, one thread each (more steps per second than one two-thread
   run on the tiny model); a command that starts alone gets every core.
3. RFT and GRPO use the answer reward without routes (the paper's baselines).
4. Differences between arms are paired: the same seed's start, the same evaluation problems. With
   several seeds the seeds are the unit: a 95 % t interval over the per-seed mean differences (Student's
   t with seeds - 1 degrees of freedom). Beside it, a paired two-stage bootstrap (seeds, then problems
   within a seed; 1,000 draws, percentile interval), which treats five seeds as if they were many and is
   narrower than it should be; with one seed it is the problems' sampling alone, and says nothing of the
   spread of the starts, so one seed cannot decide a comparison.
5. Evaluation on test alone (--eval-splits adds hard; dev is for choosing settings). `--quick` gives every
   arm QUICK_RL_STEPS RL steps, from the default start: out/distill where it holds the distillation the
   ablation would run (the same seed and flags; `python train.py --stage rl` makes it), else the default
   distillation run here. A shorter distillation would start the arms from a student that has not learned
   the domain. Ready runs start seed by seed and, within a seed, longest first (`order`): an ablation
   stopped part-way holds whole seeds, and --resume runs the rest.
6. The links of ReaLM's mechanism (not with --quick): the realm arm's RL run also evaluates on the first
   eval split every third of the steps up to the hand-over (the step EAAI's signal reaches 0), so from
   the start through the phase with routes, at the hand-over and at the end; results.md tabulates them.
"""

import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import domain as D
import flags as F
import train

# name: (what it is; its start: the seed's "guided" or "unguided" distillation, or None: scratch; rl flags, or None:
# no rl)
ARMS = {
    "distill": ("distillation only (guided SFT, no RL)", "guided", None),
    "rft": ("RFT: fine-tune on its own right answers, no routes", "guided",
            ["--algo", "rft", "--routes", "none", "--reward", "answer"]),
    "grpo": ("GRPO without routes, answer reward", "guided", ["--routes", "none", "--reward", "answer"]),
    "cot-synth": ("CoT-Synthesizer style: routes always, answer reward", "guided",
                  ["--no-anneal", "--reward", "answer"]),
    "mrpv": ("MRPV without EAAI: routes always, answer + verdict rewards", "guided", ["--no-anneal"]),
    "eaai": ("EAAI without the verdict rewards: routes fade, answer reward", "guided", ["--reward", "answer"]),
    "realm": ("ReaLM: MRPV + EAAI", "guided", []),
    "unguided-realm": ("ReaLM from the unguided distillation", "unguided", ["--unguided"]),
    "zero": ("ReaLM-Zero: ReaLM from the random-weight model, no SFT", None, []),
}
DEFAULT_ARMS = ("distill", "rft", "grpo", "cot-synth", "mrpv", "eaai", "realm")  # the paper's comparisons (choice 1)
QUICK_ARMS = ("distill", "grpo", "cot-synth", "realm")
DEFAULT_START = Path("out/distill")  # what --quick reuses when it holds the seed's distillation (choice 5)
NOT_TRAINING = ("stage", "out", "device", "eval_every", "eval_n", "eval_splits", "show", "resume", "save_every",
                "max_bad_steps", "compile")  # a distillation's flags that do not change what it trains
RL_STEPS = 60  # choice 1
QUICK_RL_STEPS = 30  # choice 5
LINKS_ARM = "realm"  # whose mechanism is measured link by link (choice 6)
SET_BY_ABLATE = ("--stage", "--init", "--data", "--eval-data")  # train.py flags the ablation sets per run
PARTS = ("_taught", "_route_only")  # the embedded domain's parts of a split (domain.py choice 5), in results.jsonl


# ---- flags ----

def parser():
    ap = F.Parser(description="ReaLM's ablation: every arm from one distilled start, over seeds, "
                                "into one table. Any other flag is a train.py flag given to every arm.",
                    allow_abbrev=False)
    ap.add_argument("--arms", help=f"comma-separated arms (default: {','.join(DEFAULT_ARMS)}; --quick: "
                    f"{','.join(QUICK_ARMS)}); of: {','.join(ARMS)}")
    ap.add_argument("--seeds", type=F.count, default=None, help="seeds per arm, from --seed on (default 5; --quick: 1)")
    ap.add_argument("--seed", type=int, default=0, help="the first seed")
    ap.add_argument("--quick", action="store_true", help="the paper's two comparisons' arms (unless --arms), one seed "
                    f"(unless --seeds), {QUICK_RL_STEPS} RL steps (unless --steps), from {DEFAULT_START} where it "
                    "holds the seed's distillation")
    ap.add_argument("--distill-steps", type=F.count, default=F.STAGE_DEFAULTS["distill"]["steps"],
                    help="steps of each seed's distillation (default: train.py's, %(default)s)")
    ap.add_argument("--jobs", type=F.count, default=None,
                    help="runs at a time, sharing the CPU cores (default: 2 on CPU, 1 on CUDA)")
    ap.add_argument("--eval-splits", default="test", help="the embedded splits every arm is evaluated on (default "
                    "test; of dev, test, hard: choose settings on dev, never on test)")
    ap.add_argument("--out", default="out/ablate", help="the ablation's folder")
    ap.add_argument("--resume", action="store_true", help="run what --out's runs.jsonl lacks, with the saved flags")
    return ap


def get_args(argv):
    """(the ablation's flags, the train.py flags passed through, those flags as rl parses them)."""
    ap = parser()
    args, rest = ap.parse_known_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 5)
    args.arms = args.arms.split(",") if args.arms else list(QUICK_ARMS if args.quick else DEFAULT_ARMS)
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise D.DataError(f"--arms: unknown arm(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
    args.splits = D.eval_splits(args.eval_splits)
    set_here = [f for f in rest if f.split("=")[0] in SET_BY_ABLATE]
    if set_here:
        raise D.DataError(f"{set_here[0]}: the ablation sets it for each run (it runs on the embedded domain)")
    if any(f.split("=")[0] == "--show" for f in rest):
        raise D.DataError("--show: is for train.py --stage eval (the ablation's evaluations score every problem)")
    args.rl_steps = QUICK_RL_STEPS if args.quick else RL_STEPS  # unless rest has --steps
    rl = F.parse(["--stage", "rl", "--steps", str(args.rl_steps), *rest])  # checks every passed-through flag
    args.reused = {s: p for s in range(args.seed, args.seed + args.seeds) if (p := reused_start(args, rest, s))}
    return args, rest, rl


def distill_flags(rest):
    """The passed-through flags that also go to the distillation: all but flags.py's rl and optimization
    groups (the arms' RL settings)."""
    rl_only = F.in_groups("rl", "optimization")
    flags, keep = [], False
    for f in rest:
        if f.startswith("--"):
            keep = f.split("=")[0] not in rl_only
        if keep:
            flags.append(f)
    return flags


# ---- the runs ----

class Run(NamedTuple):
    key: tuple  # (arm, seed), or ("guided" / "unguided", seed) for a distillation
    needs: tuple | None  # the distillation it starts from
    folder: Path  # what it writes (an arm's eval.jsonl lands here)
    cmds: list  # its train.py commands, run one after another


def reused_start(args, rest, seed):
    """--quick: DEFAULT_START when it holds the distillation this ablation would run for `seed` (the same flags but
    for those that do not change what it trains), else None (choice 5)."""
    state = DEFAULT_START / "trainer_state.pt"
    if not args.quick or not (DEFAULT_START / "config.json").is_file() or not state.is_file():
        return None
    saved = torch.load(state, map_location="cpu", weights_only=False).get("args", {})
    argv = ["--stage", "distill", *distill_flags(rest), "--steps", str(args.distill_steps), "--seed", str(seed)]
    wanted = vars(F.parse(argv))
    same = all(saved.get(k) == v for k, v in wanted.items() if k not in NOT_TRAINING)
    return DEFAULT_START if same and saved.get("stage") == "distill" else None


def runs_of(args, rest, rl, out: Path):
    """Each seed's distillation(s) (or --quick's reused start), then each arm: rl from that start, then eval."""
    py = [sys.executable, str(Path(train.__file__).resolve())]
    distill_cmd = [*py, "--stage", "distill", *distill_flags(rest), "--eval-n", "0", "--steps", str(args.distill_steps)]
    rl_cmd = [*py, "--stage", "rl", "--steps", str(args.rl_steps), *rest, "--eval-n", "0", "--save-every", "0"]
    eval_cmd = [*py, "--stage", "eval", *rest, "--eval-splits", args.eval_splits]
    seeds = range(args.seed, args.seed + args.seeds)
    runs = []
    for s in seeds:
        reused = args.reused.get(s)
        start = {"guided": reused or out / f"seed{s}" / "distill", "unguided": out / f"seed{s}" / "distill-unguided"}
        for kind, folder in start.items():
            if kind == "guided" and reused:
                continue  # made before: the arms start at once
            if any(ARMS[a][1] == kind for a in args.arms):
                unguided = ["--unguided"] if kind == "unguided" else []
                cmd = [*distill_cmd, "--seed", str(s), "--out", str(folder), *unguided]
                runs.append(Run((kind, s), None, folder, [cmd]))
        for a in args.arms:
            _, kind, arm_flags = ARMS[a]
            folder = out / f"seed{s}" / a
            init = str(start[kind]) if kind else "scratch"
            measure = link_flags(args, rl) if a == LINKS_ARM else []
            cmds = []
            if arm_flags is not None:
                cmds.append([*rl_cmd, "--seed", str(s), "--init", init, "--out", str(folder), *arm_flags, *measure])
            cmds.append([*eval_cmd, "--init", str(start[kind] if arm_flags is None else folder), "--out", str(folder)])
            needs = None if kind is None or (kind == "guided" and reused) else (kind, s)
            runs.append(Run((a, s), needs, folder, cmds))
    return runs


def handover(rl):
    """The RL step at which EAAI's signal reaches 0 (the last step with routes is the one before)."""
    return round((rl.eaai_hold + rl.eaai_decay) * rl.steps)


def link_flags(args, rl):
    """The realm arm's evaluations during RL (choice 6): every third of the steps to the hand-over, on the first
    eval split, as many problems as its final evaluation."""
    if args.quick or handover(rl) < 1:
        return []
    split = args.splits[0]
    n = D.EVAL_SIZES[split] if rl.eval_n is None else rl.eval_n
    return ["--eval-every", str(max(1, handover(rl) // 3)), "--eval-n", str(n), "--eval-splits", split]


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


def order(run: Run):
    """Ready runs start seed by seed, then longest first (choice 5): a distillation (its seed's arms wait on it),
    arms that show routes on every prompt, arms whose routes fade, arms without routes, an evaluation alone."""
    if run.key[0] not in ARMS:  # a distillation
        return run.key[1], -4
    flags = ARMS[run.key[0]][2]
    longest = 0 if flags is None else 3 if "--no-anneal" in flags else 1 if "none" in flags else 2
    return run.key[1], -longest


def start(argv):
    """The ablation's flags and folder: a new run (the folder emptied, its command saved) or --resume."""
    args, rest, rl = get_args(argv)
    out = Path(args.out)
    saved = out / "ablate.json"
    if args.resume:  # the saved command's flags; runs already finished (runs.jsonl) are skipped
        if not saved.is_file():
            raise D.DataError(f"--resume: {saved} not found")
        run = json.loads(saved.read_text())
        jobs = args.jobs
        args, rest, rl = get_args(run["argv"])
        args.jobs, args.resume, args.out = jobs, True, str(out)
        return args, rest, rl, out, run["command"]
    command = " ".join(["python ablate.py", *map(shlex.quote, argv)])
    train.fresh_run_folder(out)
    saved.write_text(json.dumps({"command": command, "argv": argv}, indent=1) + "\n")
    return args, rest, rl, out, command


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run_ablation(argv)
    except (D.DataError, train.TrainingError) as e:
        sys.exit(f"error: {e}")


def run_ablation(argv):
    args, rest, rl, out, command = start(argv)
    jobs = args.jobs or (1 if F.pick_device(rl.device).type == "cuda" else 2)
    done = out / "runs.jsonl"
    finished = {tuple(json.loads(x)["key"]) for x in done.read_text().splitlines()} if done.is_file() else set()
    pending = [r for r in runs_of(args, rest, rl, out) if r.key not in finished]
    print(f"ablate: arms {', '.join(args.arms)}; seeds {args.seed}..{args.seed + args.seeds - 1}; {rl.steps} rl "
          f"steps of {rl.prompts_per_step} prompts x {rl.num_generations} samples each, from each seed's distillation "
          f"({args.distill_steps} steps{reused_text(args)}); "
          f"eval on {', '.join(args.splits)}; {len(pending)} runs, {jobs} at a time; "
          f"writing {out}/ (each run's output in its .log)", flush=True)
    cores, failed, t0 = os.cpu_count() or 1, [], time.time()
    bar = tqdm(total=len(pending), desc="ablate", dynamic_ncols=True)
    with ThreadPoolExecutor(jobs) as pool:
        running = {}
        while pending or running:
            ready = sorted((r for r in pending if r.needs is None or r.needs in finished), key=order)
            for r in ready[:jobs - len(running)]:
                threads = max(1, cores // min(jobs, len(ready) + len(running)))  # alone: every core (choice 2)
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
                record(out, r, seconds, threads)
                write_table(out, args, rl, command)  # the table so far, after every run
                name = r.key[0] if r.key[0] in ARMS else f"{r.key[0]} distillation"
                tqdm.write(f"{name}, seed {r.key[1]}: done in {seconds / 60:.1f} min ({threads} threads)")
    bar.close()
    if done.is_file():  # also what rebuilds the table on a --resume with nothing left to run
        for line in write_table(out, args, rl, command):  # the paper's comparisons, as far as the arms allow
            print(line)
    print(f"ablate: {time.time() - t0:.0f} s; wrote {out}/results.md and results.jsonl")
    if failed or pending:
        raise train.TrainingError(f"{len(failed)} run(s) failed and {len(pending)} did not start; first: {failed[0]} "
                                  f"(fix it, then: python ablate.py --out {out} --resume)")


def record(out: Path, r: Run, seconds, threads):
    """A finished run: its results first, then its line in runs.jsonl (a run there is never rerun by --resume).
    A result line: the arm's accuracies, each problem's 0 / 1 (paired comparisons), and its autonomous updates
    (RL steps whose prompts showed no route, skipped ones left out) with their summed learning rate."""
    if r.key[0] in ARMS:
        metrics = r.folder / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        steps = [x for x in map(json.loads, lines) if x.get("stage") == "rl"]
        auto = [x["lr"] for x in steps if x["autonomous"] and not x["skipped_updates"]]
        for split, row in last_eval(r.folder).items():
            train.log(out / "results.jsonl", arm=r.key[0], seed=r.key[1], split=split, n=row["n"],
                      **{k: row.get(k) for k in ("acc_autonomous", "acc_with_routes", "verdict_acc", "right_autonomous",
                                                 "right_with_routes", *VERDICTS)},
                      **{k: v for k, v in row.items()
                         if k.endswith(PARTS) or k.startswith(("n_", "rule_prior")) or k == "route_only"},
                      updates=len(steps), autonomous_updates=len(auto), autonomous_lr_sum=sum(auto))
    train.log(out / "runs.jsonl", key=list(r.key), minutes=round(seconds / 60, 2), threads=threads,
              commands=[" ".join(c) for c in r.cmds])


def last_eval(folder: Path):
    """{split: the last eval line of that split} in a run folder's eval.jsonl."""
    return {row["split"]: row for row in map(json.loads, (folder / "eval.jsonl").read_text().splitlines())}


# ---- the table ----

def mean_std(xs, sign=""):
    """'41.9 ± 1.2' in percent (sample std over seeds, none for one seed); sign="+": '+1.9 ± 0.4'."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{100 * m:{sign}.1f}"
    return f"{100 * m:{sign}.1f} ± {100 * (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5:.1f}"


class Diff(NamedTuple):
    """Arm a minus arm b, in points (choice 4)."""
    mean: float  # over the seeds both have and their problems
    low: float  # the paired two-stage bootstrap's 95 % interval
    high: float
    seeds: int
    t_low: float | None  # the t interval over the per-seed differences (None with one seed)
    t_high: float | None


@functools.lru_cache
def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (p > 0.5) by integrating its density from 0 on a fine grid (numpy, no scipy)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    x = np.linspace(0.0, 200.0, 2_000_001)
    pdf = c * (1 + x * x / df) ** (-(df + 1) / 2)
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * (x[1] - x[0]))])  # trapezoid rule
    return float(np.interp(p, cdf, x))


def paired_ci(a: dict, b: dict, draws=1000):
    """Arm a minus arm b in points, from each problem's 0 / 1 of both ({seed: '0110...'}, the same problems):
    the mean over the seeds both have and their problems, with two 95 % intervals (choice 4): a t interval
    over the per-seed mean differences (the seeds are the unit), and a paired two-stage bootstrap: draw the
    seeds with replacement, then the problems within each drawn seed, the same draws for both arms.
    Returns a Diff, or None when no seed has both."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    bits = lambda x: np.frombuffer(x.encode(), dtype=np.uint8) - ord("0")
    d = np.stack([bits(a[s]).astype(np.int8) - bits(b[s]) for s in seeds])  # (S, n) in {-1, 0, 1}
    S, n = d.shape
    rng = np.random.default_rng(0)
    rows = rng.integers(0, S, (draws, S, 1), dtype=np.int32)
    cols = rng.integers(0, n, (draws, S, n), dtype=np.int32)
    means = d[rows, cols].mean(axis=(1, 2))  # (draws,)
    low, high = np.percentile(means, [2.5, 97.5])
    t_low = t_high = None
    if S > 1:
        per_seed = d.mean(axis=1)  # (S,)
        half = t_quantile(0.975, S - 1) * per_seed.std(ddof=1) / math.sqrt(S)
        t_low, t_high = 100 * (per_seed.mean() - half), 100 * (per_seed.mean() + half)
    return Diff(100 * d.mean(), 100 * low, 100 * high, S, t_low, t_high)


def ci_text(c: Diff | None):
    """'+2.0 [-1.0, +5.0] (bootstrap [+0.5, +3.5])' over seeds; '+2.0 [+0.5, +3.5]' (the bootstrap) with one."""
    if c is None:
        return ""
    boot = f"[{c.low:+.1f}, {c.high:+.1f}]"
    if c.seeds == 1:
        return f"{c.mean:+.1f} {boot}"
    return f"{c.mean:+.1f} [{c.t_low:+.1f}, {c.t_high:+.1f}] (bootstrap {boot})"


def over_seeds(res, arm, seeds, split, key):
    """mean ± std of a result line's `key` over the seeds whose line for (arm, split) holds it; '-' if none."""
    xs = [v for s in seeds if (arm, s, split) in res and (v := res[arm, s, split].get(key)) is not None]
    return mean_std(xs) if xs else "-"


def mean_or_dash(xs):
    return f"{sum(xs) / len(xs):.1f}" if xs else "-"


def cpu_name():
    """'2 CPUs (Intel(R) Xeon(R) ...)' from /proc/cpuinfo where there is one."""
    name = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        name = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                     if x.startswith("model name")), name)
    return f"{os.cpu_count()} CPUs ({name})"


KINDS = {"alone": "autonomous", "with routes": "with_routes"}
VERDICTS = {"verdict_acc_own_right": "verdicts, own answer right",  # with routes (evaluate.evaluate)
            "verdict_acc_own_wrong": "verdicts, own answer wrong", "step_acc": "first wrong step named"}
PARTS_SHOWN = {"_taught": "taught", "_route_only": "route-only", "": "all"}  # a split's parts in the table, or all
COMPARISONS = (("realm", "cot-synth", "with routes"), ("realm", "grpo", "alone"))  # the paper's two (its abstract)


def part_bits(row, kind, part):
    """A result line's 0 / 1 string for `kind` over the problems of `part` ('' all, '_taught', '_route_only')."""
    bits = row[f"right_{kind}"]
    if not part:
        return bits
    keep = "1" if part == "_route_only" else "0"
    return "".join(b for b, m in zip(bits, row["route_only"]) if m == keep)


def parts_of(rows):
    """The parts a split's lines have problems in: taught and route-only on the embedded domain, else all."""
    return [p for p in ("_taught", "_route_only") if any(r.get(f"n{p}") for r in rows)] or [""]


def header(args, rl, command, runs, seeds):
    """results.md's title, command and what every table below shares: the start, the budget, the machine."""
    minutes = [r["minutes"] for r in runs if r["key"][0] == "guided"]
    took = f"{mean_or_dash(minutes)} min a seed" if minutes else ""  # none where every start was reused
    start = [f"{args.distill_steps} steps", took, reused_text(args).removeprefix("; ")]
    machine = torch.cuda.get_device_name() if F.pick_device(rl.device).type == "cuda" else cpu_name()
    return ["# ReaLM ablation on the embedded domain", "", f"`{command}`", "",
            f"- Every arm starts from the same seed's guided distillation ({'; '.join(filter(None, start))}) "
            "except where its row says otherwise, and gets the same "
            f"budget: {rl.steps} RL steps of {rl.prompts_per_step} prompts x {rl.num_generations} samples "
            f"(learning rate {rl.lr:g}: {rl.lr_schedule} after {rl.warmup} warm-up steps).",
            f"- Greedy accuracy (%), mean ± std over the seeds done (of {', '.join(map(str, seeds))}), on taught "
            f"problems (what the distillation teaches) and route-only ones (a rule only the teacher's routes "
            f"carry); 'alone': no routes in the prompt; 'with routes': {rl.K} teacher routes, right and wrong. "
            f"'Verdicts': the share of shown routes judged right (chance 50 %). 'Autonomous': RL updates with no "
            f"route in any prompt, and their summed learning rate.",
            f"- Machine: {machine}; torch {torch.__version__}; the runs' times add up to "
            f"{sum(r['minutes'] for r in runs):.0f} min."]


def write_table(out: Path, args, rl, command):
    """results.md: per split, each arm's accuracy alone and with routes and its verdicts, by part (taught,
    route-only), mean ± std over the seeds done, with its autonomous updates; each arm against the distilled
    start, GRPO and CoT-Synthesizer style: paired differences with 95 % intervals, by part; whether the start
    reads routes; the paper's two comparisons on route-only problems (also returned, as lines); ReaLM's links
    (choice 6)."""
    results = out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.is_file() else []
    res = {(r["arm"], r["seed"], r["split"]): r for r in rows}  # a rerun's line wins
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    minutes = lambda name: [r["minutes"] for r in runs if r["key"][0] == name]
    seeds, splits = range(args.seed, args.seed + args.seeds), args.splits
    done = lambda a: [s for s in seeds if (a, s, splits[0]) in res]
    bits = lambda a, sp, k, part: {s: part_bits(res[a, s, sp], k, part) for s in done(a)}
    lines = header(args, rl, command, runs, seeds) + start_lines(res, args, splits[0])
    for sp in splits:
        here = [r for r in rows if r["split"] == sp]
        parts, n = parts_of(here), "/".join(map(str, sorted({r["n"] for r in here})))
        sizes = ", ".join(f"{'/'.join(map(str, sorted({r[f'n{p}'] for r in here})))} {PARTS_SHOWN[p]}"
                          for p in parts if p)
        head = " | ".join(f"{PARTS_SHOWN[p]} {m}" for p in parts for m in KINDS)
        lines += ["", f"## {sp}: {n} problems{f' ({sizes})' if sizes else ''}", "",
                  f"| arm | what | seeds | {head} | " + " | ".join(f"verdicts {PARTS_SHOWN[p]}" for p in parts)
                  + " | autonomous updates (Σ lr) | min a run |", "|---|---|---|" + "---|" * (3 * len(parts) + 2)]
        for a in args.arms:
            ds = [s for s in done(a) if (a, s, sp) in res]
            cell = lambda key: over_seeds(res, a, ds, sp, key)
            auto = [(res[a, s, sp]["autonomous_updates"], res[a, s, sp]["autonomous_lr_sum"]) for s in ds]
            lr_sum = sum(x for _, x in auto) / max(1, len(auto))
            auto = f"{mean_or_dash([u for u, _ in auto])} ({lr_sum:.2g})" if auto else ""
            accs = " | ".join(cell(f"acc_{k}{p}") for p in parts for k in KINDS.values())
            verdicts = " | ".join(cell(f"verdict_acc{p}") for p in parts)
            took = mean_or_dash(minutes(a))
            lines.append(f"| {a} | {ARMS[a][0]} | {len(ds)} | {accs} | {verdicts} | {auto} | {took} |")
        lines += verdict_lines(args, res, sp, done)
        for ref in ("distill", "grpo", "cot-synth"):
            if ref not in args.arms or not done(ref):
                continue
            lines += ["", f"Each arm minus {ref}, {sp}, paired by seed and problem: mean difference in points, "
                          "[95 % t interval over the seeds] and (the paired bootstrap's); with one seed, the "
                          "bootstrap over its problems alone:",
                      "", f"| arm | seeds | {head} |", "|---|---|" + "---|" * len(parts) * 2]
            for a in args.arms:
                cis = [paired_ci(bits(a, sp, k, p), bits(ref, sp, k, p)) for p in parts for k in KINDS.values()]
                if a != ref and cis[0]:
                    lines.append(f"| {a} | {cis[0].seeds} | " + " | ".join(ci_text(c) for c in cis) + " |")
        if "distill" in args.arms and done("distill"):  # does the start read routes? (routes help)
            gains = [(p, paired_ci(bits("distill", sp, "with_routes", p), bits("distill", sp, "autonomous", p)))
                     for p in parts]
            lines += ["", f"The start, {sp}: with routes minus alone "
                      + "; ".join(f"{PARTS_SHOWN[p]} {ci_text(c)}" for p, c in gains)
                      + f" points (paired over {gains[0][1].seeds} seed(s))."]
    sp = splits[0]
    part = "_route_only" if "_route_only" in parts_of([r for r in rows if r["split"] == sp]) else ""
    paper = []
    for a, b, mode in COMPARISONS:
        both = a in args.arms and b in args.arms
        c = paired_ci(bits(a, sp, KINDS[mode], part), bits(b, sp, KINDS[mode], part)) if both else None
        if c:
            alone = ("; one seed: the interval is over its problems alone and cannot decide between the methods "
                     "(--seeds 5)") if c.seeds == 1 else ""
            paper.append(f"{a} minus {b}, {sp} {PARTS_SHOWN[part]} problems {mode}: {ci_text(c)} points (paired over "
                         f"{c.seeds} seed(s){alone})")
    lines += [x for p in paper for x in ("", f"**{p}**.")]
    lines += links(out, args, rl, done(LINKS_ARM) if LINKS_ARM in args.arms else [])
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return paper


def verdict_lines(args, res, sp, done):
    """Each arm's verdicts with routes, split by whether its own answer is right, and its step_acc (mean ± std)."""
    rows = [f"| {a} | " + " | ".join(over_seeds(res, a, done(a), sp, k) for k in VERDICTS) + " |"
            for a in args.arms if done(a)]
    return ["", f"Verdicts on {sp}, with routes (%): by whether the arm's own answer is right, and the share of shown "
                "wrong routes whose first wrong step it names:", "", "| arm | " + " | ".join(VERDICTS.values()) + " |",
            "|---|" + "---|" * len(VERDICTS), *rows]


def reused_text(args):
    return "".join(f"; seed {s}: {p}/, made before the ablation and reused" for s, p in args.reused.items())


START = (("acc_autonomous_taught", "taught alone"), ("verdict_acc_taught", "taught verdicts"),
         ("acc_autonomous_route_only", "route-only alone"), ("acc_with_routes_route_only", "route-only with routes"),
         ("rule_prior", "R5 in its own samples"))


def start_lines(res, args, split):
    """The distilled start of each seed first: what every arm starts from (has it learned the domain, does it read
    routes, how often do its own samples apply the route-only rule)."""
    got = [(s, res[key]) for s in range(args.seed, args.seed + args.seeds) if (key := ("distill", s, split)) in res]
    if not got:
        return []
    cell = lambda r, k: "-" if r.get(k) is None else f"{100 * r[k]:.1f}"
    head = ["", f"The start of each seed ({split}, %; R5 in its own samples: the share of its sampled delivery lines, "
                "alone, that apply the route-only rule):", "", "| seed | " + " | ".join(n for _, n in START) + " |",
            "|---|" + "---|" * len(START)]
    return head + [f"| {s} | " + " | ".join(cell(r, k) for k, _ in START) + " |" for s, r in got]


LINKS = (("acc_with_routes_route_only", "route-only with routes"), ("verdict_acc_route_only", "verdicts route-only"),
         ("acc_autonomous_route_only", "route-only alone"), ("acc_autonomous_taught", "taught alone"))


def links(out: Path, args, rl, seeds):
    """ReaLM's mechanism link by link (choice 6), from its RL run's evaluations on the first split: the start,
    the steps with routes, the hand-over and the end; mean ± std over the seeds."""
    evals = {}
    for s in seeds:
        path = out / f"seed{s}" / LINKS_ARM / "metrics.jsonl"
        for row in map(json.loads, path.read_text().splitlines() if path.is_file() else []):
            if row.get("split") == args.splits[0] and "acc_with_routes_route_only" in row:
                evals.setdefault(row["step"], []).append(row)
    if not evals:
        return []
    def what(step):
        if step == 0:
            return "the start (after SFT)"
        if step == rl.steps:
            return "end"
        if step == handover(rl):
            return "hand-over"
        return "routes shown" if step < handover(rl) else "alone"

    lines = ["", f"ReaLM's links, {args.splits[0]} ({LINKS_ARM}'s RL run; EAAI's signal reaches 0 at step "
             f"{handover(rl)}), "
             f"mean ± std over the seeds:", "", "| step | | seeds | " + " | ".join(name for _, name in LINKS) + " |",
             "|---|---|---|" + "---|" * len(LINKS)]
    for step, got in sorted(evals.items()):
        cells = [mean_std(xs) if (xs := [r[k] for r in got if r.get(k) is not None]) else "-" for k, _ in LINKS]
        lines.append(f"| {step} | {what(step)} | {len(got)} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
