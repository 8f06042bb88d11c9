"""Benchmarks of the training steps and the sampler, and a side-by-side comparison with another commit.

    python bench.py tiny                        # RL steps of the tiny default model, phase by phase (rl defaults)
    python bench.py qwen2.5-0.5b --compile      # any shape, any train.py rl flag: --prompts-per-step, --mu, ...
    python bench.py sft                         # SFT steps of the default distillation (its late, MRPV-mixed batches)
    python bench.py sampler                     # rollout.generate against transformers' generate, same weights
    python bench.py compare HEAD~1 -- tiny      # one of the above on the working tree and on a commit, alternating
    python bench.py sft --profile               # any of them, then where the time went (torch.profiler, by operator;
                                                # sampler: both samplers together)

Each benchmark leaves out its first step (a warm-up) and prints the mean (tiny, sft) or the median of its rounds
(sampler). `compare` checks the commit out into a temporary git worktree, copies this file there, and runs
the benchmark there and here by turns, --rounds times each; it prints each figure's median on both sides
and their ratio. A speed claim is that ratio: two runs on one machine minutes apart differ by more than
most changes (RESULTS.md). The timed processes run one at a time; nothing else should run beside them.
The decoder's own benchmark is `python model.py --bench`, the sampler's against recompute `python
rollout.py --bench`. `sampler` needs transformers installed (pip install transformers); nothing else does.
"""

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import domain as D
import model as M
import train

MODES = ("sft", "sampler", "compare")


def rl_report(args) -> dict:
    """Print the mean phase times of the run's RL steps (the first left out) and the peak memory."""
    rows = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("stage") == "rl"][1:] or rows[-1:]
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    sampled, trained = mean("sampled_tokens"), mean("trained_tokens")
    print(f"bench {args.scratch_shape}: {args.prompts_per_step} prompts x {args.num_generations} samples, up to "
          f"{args.max_new_tokens} new tokens, mu {args.mu}{', --compile' if args.compile else ''}"
          f"{', --grad-checkpointing' if args.grad_checkpointing else ''}; mean of {len(rows)} steps")
    for phase, tokens, what in [("rollout", sampled, "sampled"), ("reward", sampled, "scored"),
                                ("backward", trained, "trained (forward + backward)"), ("optimizer", None, "")]:
        t = mean(f"time_{phase}")
        print(f"  {phase:>9} {t:8.3f} s" + (f" | {tokens / t:9.0f} tok/s {what}" if tokens and t > 0 else ""))
    print(f"  {'step':>9} {mean('step_s'):8.3f} s | peak memory {max(r['peak_gib'] for r in rows):.2f} GiB")
    return {"rl step s": mean("step_s"), "rollout s": mean("time_rollout"), "backward s": mean("time_backward")}


def bench_rl(shape, rest) -> dict:
    if any(f.split("=")[0] in ("--stage", "--init", "--data", "--resume") for f in rest):
        sys.exit("error: the benchmark sets --stage, --init and --data itself "
                 "(a random-weight model, the embedded domain)")
    args = train.get_args(["--stage", "rl", "--init", "scratch", "--scratch-shape", shape, "--eval-n", "0",
                           "--steps", "3", "--out", f"out/bench-{shape}", *rest])
    train.run_rl(args)
    return rl_report(args)


def bench_sft(rest) -> dict:
    """SFT steps of `train.py --stage distill` as it runs them (its examples, batches, micro-batches and
    optimizer), with MRPV examples mixed in from the first step (--mrpv-from 0): the batches of the
    distillation's later, slower part. Times distill.sft_step (forward and backward) and the whole step."""
    import distill
    if any(f.split("=")[0] in ("--stage", "--steps", "--eval-n", "--out") for f in rest):
        sys.exit("error: the sft benchmark sets --stage, --steps, --eval-n and --out itself")
    args = train.get_args(["--stage", "distill", "--steps", "6", "--mrpv-from", "0", "--eval-n", "0",
                           "--out", "out/bench-sft", *rest])
    times, tokens, inner = [], [], distill.sft_step

    def timed(model, batch, *a, **kw):  # the step's forward and backward, and the wall time between two calls
        times.append(time.perf_counter())
        loss = inner(model, batch, *a, **kw)
        times.append(time.perf_counter())
        tokens.append(sum(len(e[0]) + len(e[1]) - 1 for e in batch))
        return loss
    distill.sft_step = timed
    try:
        train.run_distill(args)
    finally:
        distill.sft_step = inner
    fb = [b - a for a, b in zip(times[0::2], times[1::2])][1:]  # the first step left out
    # start to start: the whole step, batch drawing included
    step = [b - a for a, b in zip(times[0::2], times[2::2])][1:]
    print(f"bench sft: batch {args.batch_size} + {train.drills(args)} drills, {args.mrpv_share:.0%} MRPV examples, "
          f"micro-tokens {args.micro_tokens}; mean of {len(fb)} steps")
    print(f"  forward+backward {sum(fb) / len(fb):8.3f} s | {sum(tokens[1:]) / sum(fb):9.0f} tok/s "
          f"(real tokens, padding not counted)")
    print(f"  {'step':>16} {sum(step) / len(step):8.3f} s (start to start, {len(step)} steps)")
    return {"sft step s": sum(step) / len(step), "sft forward+backward s": sum(fb) / len(fb)}


def bench_sampler(rest) -> dict:
    """rollout.generate against transformers' generate (greedy, float32, CPU) on the same random weights of
    the tiny default shape in the Qwen2 layout (q, k, v biases): 16 prompts of 32 tokens, 128 new tokens, no
    end token. Checks the tokens are equal, then times both by turns; prints the medians."""
    import rollout
    p = train.Parser(prog="bench.py sampler")
    p.add_argument("--rounds", type=train.count, default=5, help="timed calls of each sampler, by turns")
    p.add_argument("--batch", type=train.count, default=16, help="prompts")
    p.add_argument("--new-tokens", type=train.count, default=128, help="new tokens per prompt")
    args = p.parse_args(rest)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        sys.exit("error: bench.py sampler compares with transformers, which is not installed "
                 "(pip install transformers)")
    torch.manual_seed(0)
    cfg = M.tiny_config(M.TINY_VOCAB, qkv_bias=True, architecture="Qwen2ForCausalLM")
    model = M.Transformer(cfg)
    with torch.no_grad():  # larger than the 0.02 init, so that greedy tokens are far from ties
        for w in model.parameters():
            w.normal_(0, 0.05)
    with tempfile.TemporaryDirectory() as folder:
        M.save_model(model, folder)
        ours = M.load_model(folder, "cpu").eval()
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, 32), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(prompts)

    def run_ours():
        return [s.tokens
                for s in rollout.generate(ours, prompts.tolist(), max_new_tokens=args.new_tokens, temperature=0)]

    @torch.inference_mode()
    def run_theirs():
        out = theirs.generate(prompts, attention_mask=ones, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, prompts.shape[1]:].tolist()
    equal = sum(a == b for a, b in zip(run_ours(), run_theirs()))  # also the warm-up of both
    times = {"ours": [], "transformers": []}
    for _ in range(args.rounds):
        for name, run in (("ours", run_ours), ("transformers", run_theirs)):
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = args.batch * args.new_tokens
    print(f"bench sampler: tiny shape, Qwen2 layout, {args.batch} prompts x 32 tokens, {args.new_tokens} new tokens, "
          f"greedy, {torch.get_num_threads()} threads; greedy tokens equal on {equal}/{args.batch} rows")
    for k, v in times.items():
        print(f"  {k:>12} {med[k]:7.3f} s median of {len(v)} ({', '.join(f'{x:.3f}' for x in v)}) | "
              f"{tok / med[k]:7.0f} tok/s")
    print(f"  ours is {med['transformers'] / med['ours']:.2f}x as fast")
    return {"sampler s": med["ours"], "transformers s": med["transformers"],
            "ours / transformers speed": med["transformers"] / med["ours"]}


def compare(rest):
    """`compare REV [--rounds N] -- BENCHMARK ARGS`: the benchmark on the working tree and on commit REV by turns."""
    p = train.Parser(prog="bench.py compare")
    p.add_argument("rev", help="the commit to compare the working tree with "
                               "(anything git accepts: HEAD, main~3, a hash)")
    p.add_argument("--rounds", type=train.count, default=3,
                   help="runs of the benchmark on each side, by turns (at least 1)")
    cut = rest.index("--") if "--" in rest else len(rest)
    # after --: the benchmark and its flags (tiny, sft, sampler, ...)
    args, bench = p.parse_args(rest[:cut]), rest[cut + 1:]
    if not bench or bench[0] == "compare":
        sys.exit("error: compare: name the benchmark after --, e.g. `python bench.py compare HEAD -- tiny`")
    here = Path(__file__).resolve().parent
    git = lambda *a, **kw: subprocess.run(["git", "-C", str(here), *a], capture_output=True, text=True, **kw)
    commit = git("rev-parse", "--verify", "--quiet", args.rev + "^{commit}").stdout.strip()
    if not commit:
        sys.exit(f"error: compare: {args.rev!r} is not a commit of the repository at {here}")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tree = Path(tmp) / "tree"
        if git("worktree", "add", "--detach", str(tree), commit).returncode:
            sys.exit(f"error: compare: git could not check out {args.rev} into a temporary worktree")
        try:
            (tree / "bench.py").write_text(Path(__file__).read_text())  # the same benchmark on both sides
            sides = {"working tree": here, commit[:10]: tree}
            figures = {side: [] for side in sides}
            for r in range(args.rounds):
                for side, folder in sides.items():
                    record = Path(tmp) / "record.json"
                    print(f"round {r + 1}/{args.rounds}: {side} ...", flush=True)
                    run = subprocess.run([sys.executable, str(folder / "bench.py"), *bench, "--record", str(record)],
                                         cwd=folder, capture_output=True, text=True)
                    if run.returncode:
                        sys.exit(f"error: compare: the benchmark failed on {side}: "
                                 f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}")
                    figures[side].append(json.loads(record.read_text()))
        finally:
            git("worktree", "remove", "--force", str(tree))
    print(f"bench {' '.join(bench)}: medians of {args.rounds} runs each, alternating")
    a, b = sides
    print(f"  {'':>24} {a:>14} {b:>14}  ratio (working tree / {b}: below 1, less time here)")
    for key in figures[a][0]:
        ma, mb = (statistics.median(f[key] for f in figures[s]) for s in (a, b))
        print(f"  {key:>24} {ma:14.3f} {mb:14.3f}  {ma / mb:5.2f}  "
              f"(runs: {', '.join(f'{f[key]:.3f}' for f in figures[a])} | "
              f"{', '.join(f'{f[key]:.3f}' for f in figures[b])})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    record = None
    if "--record" in argv:  # compare's channel: write the figures as JSON to this file
        i = argv.index("--record")
        record, argv = argv[i + 1] if i + 1 < len(argv) else None, argv[:i] + argv[i + 2:]
    if not argv or argv[0] not in (*train.SCRATCH_SHAPES, *MODES):
        sys.exit(f"error: the first argument is a benchmark: a model shape ({', '.join(train.SCRATCH_SHAPES)}) for RL "
                 f"steps, then any train.py rl flags; or one of {', '.join(MODES)}")
    mode, rest = argv[0], [a for a in argv[1:] if a != "--profile"]
    profile = "--profile" in argv[1:] and mode != "compare"
    try:
        if mode == "compare":
            return compare(argv[1:])
        with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile
              else contextlib.nullcontext()) as prof:
            figures = (bench_sft(rest) if mode == "sft" else bench_sampler(rest) if mode == "sampler"
                       else bench_rl(mode, rest))
    except (D.DataError, M.CheckpointError, train.TrainingError) as e:
        sys.exit(f"error: {e}")
    if profile:  # the whole run, warm-up and set-up included; the profiler's own cost inflates the many small operators
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
    if record:
        Path(record).write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
