"""Benchmarks of the training steps, the decoder and the sampler, and a side-by-side comparison with another commit.

    python bench.py tiny                        # RL steps of the tiny default model, phase by phase (rl defaults)
    python bench.py qwen2.5-0.5b --compile      # any shape, any train.py rl flag: --prompts-per-step, --mu, ...
    python bench.py sft                         # SFT steps of the default distillation (its late, MRPV-mixed batches)
    python bench.py sampler                     # rollout.generate against transformers' generate, same weights
    python bench.py decoder                     # the decoder's forward + backward: tiny, Qwen2.5 0.5B (1.5B on CUDA)
    python bench.py compare HEAD~1 -- tiny      # one of the above on the working tree and on a commit, alternating
    python bench.py sft --profile               # any of them, then where the time went (torch.profiler, by operator;
                                                # sampler: both samplers together)

Each benchmark leaves out its first step (a warm-up) and prints the mean (tiny, sft, decoder) or the median of
its rounds (sampler). `compare` checks the commit out into a temporary git worktree, copies this file there
(unless --their-bench), and runs the benchmark there and here by turns, --rounds times each; it prints each
figure's median on both sides and their ratio. A speed claim is that ratio: two runs on one machine minutes
apart differ by more than most changes (RESULTS.md). The timed processes run one at a time; nothing else
should run beside them. The sampler's benchmark against recompute is `python rollout.py --bench`. `sampler`
needs transformers installed (pip install transformers); nothing else does.
"""

import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import domain as D
import flags
import model as M
import train

MODES = ("sft", "sampler", "decoder", "compare")


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
    args = flags.parse(["--stage", "rl", "--init", "scratch", "--scratch-shape", shape, "--eval-n", "0",
                           "--steps", "3", "--out", f"out/bench-{shape}", *rest])
    train.run_rl(args)
    return rl_report(args)


def bench_sft(rest) -> dict:
    """SFT steps of `train.py --stage distill` (its examples, batches, micro-batches and optimizer), with MRPV
    examples mixed in from the first step (--mrpv-from 0): the batches of the distillation's later, slower part.
    The step's pieces are called here as train.run_distill calls them (no evaluation, nothing written). Times
    distill.sft_step (forward and backward) and the whole step, start to start (batch drawing included)."""
    if any(f.split("=")[0] in ("--stage", "--steps", "--eval-n") for f in rest):
        sys.exit("error: the sft benchmark sets --stage, --steps and --eval-n itself")
    args = flags.parse(["--stage", "distill", "--steps", "6", "--mrpv-from", "0", "--eval-n", "0", *rest])
    starts, fb, tokens = sft_steps(args)
    fb, tokens = fb[1:], tokens[1:]  # the first step left out
    step = [b - a for a, b in zip(starts, starts[1:])][1:]
    print(f"bench sft: batch {args.batch_size} + {train.drills(args)} drills, {args.mrpv_share:.0%} MRPV examples, "
          f"micro-tokens {args.micro_tokens}; mean of {len(fb)} steps")
    print(f"  forward+backward {sum(fb) / len(fb):8.3f} s | {sum(tokens) / sum(fb):9.0f} tok/s "
          f"(real tokens, padding not counted)")
    print(f"  {'step':>16} {sum(step) / len(step):8.3f} s (start to start, {len(step)} steps)")
    return {"sft step s": sum(step) / len(step), "sft forward+backward s": sum(fb) / len(fb)}


def sft_steps(args):
    """Run the SFT steps as train.run_distill does -> each step's start time (and the end of the last), the time
    of each distill.sft_step call, and each batch's real tokens."""
    import distill
    import grpo
    device = flags.pick_device(args.device)
    model, tok = train.load_student(args, device)
    problems, banks = train.train_set(args)
    rng = random.Random(args.seed)
    _, alone, routed = train.sft_sets(args, problems, banks, tok, rng)
    opt, autocast = train.make_optimizer(model, args), grpo.autocast_for(device)
    model.train()
    starts, fb, tokens = [], [], []
    for step in range(args.steps):
        starts.append(time.perf_counter())
        batch = train.distill_batch(step, opt, alone, routed, rng, tok, args)
        t0 = time.perf_counter()
        distill.sft_step(model, batch, tok.pad_id, args.micro_tokens, autocast)
        fb.append(time.perf_counter() - t0)
        tokens.append(sum(len(e[0]) + len(e[1]) - 1 for e in batch))
        train.optimizer_step(model, opt, args.grad_clip)
    starts.append(time.perf_counter())
    return starts, fb, tokens


def bench_sampler(rest) -> dict:
    """rollout.generate against transformers' generate (greedy, float32, CPU) on the same random weights of
    the tiny default shape in the Qwen2 layout (q, k, v biases): 16 prompts of 32 tokens, 128 new tokens, no
    end token. Checks the tokens are equal, then times both by turns; prints the medians."""
    import rollout
    p = flags.Parser(prog="bench.py sampler")
    p.add_argument("--rounds", type=flags.count, default=5, help="timed calls of each sampler, by turns")
    p.add_argument("--batch", type=flags.count, default=16, help="prompts")
    p.add_argument("--new-tokens", type=flags.count, default=128, help="new tokens per prompt")
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


BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 peak of the cards


def train_flops(cfg: M.ModelConfig, n_params, seq):
    """FLOPs per trained token: 6 per parameter (forward 2, backward 4) plus attention's 12 * layers *
    width * context (the PaLM paper's count; causal masking not discounted)."""
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def bench_decoder(rest) -> dict:
    """The decoder alone (model.py): forward + backward steps of random weights on random tokens, for the tiny
    shape and Qwen2.5-0.5B's (and 1.5B's on CUDA); bfloat16 on CUDA, float32 on a CPU. Prints tokens/s, the peak
    memory and, in bfloat16 on a card of BF16_FLOPS, the MFU."""
    p = flags.Parser(prog="bench.py decoder")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--steps", type=flags.count, default=3, help="timed steps per shape, after one warm-up step")
    p.add_argument("--threads", type=flags.natural, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = flags.pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; peak memory is "
          f"{'allocated CUDA memory' if device.type == 'cuda' else 'the process peak RSS, reset per config'}")
    big = (8, 1024) if device.type == "cuda" else (1, 256)
    runs = [("tiny", M.tiny_config(M.TINY_VOCAB), (8, 256)), ("qwen2.5-0.5b", M.qwen25_05b_config(), big)]
    if device.type == "cuda":
        runs.append(("qwen2.5-1.5b", M.qwen25_15b_config(), big))
    return {f"{name} step s": decoder_steps(cfg, name, *shape, args.steps, device, dtype)
            for name, cfg, shape in runs}


def decoder_steps(cfg: M.ModelConfig, name, batch, seq, steps, device, dtype) -> float:
    """Time `steps` forward + backward steps of a random-weight model (after one warm-up); print one line and
    return the seconds per step."""
    M.peak_memory_reset(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = M.Transformer(cfg).to(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        logits = model(tokens[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    line = (f"{name:>12} | {n_params / 1e6:7.1f}M params | {str(dtype).removeprefix('torch.'):>8} | "
            f"B={batch} T={seq} | fwd+bwd {batch * seq / dt:9.0f} tok/s | {dt * 1000:8.1f} ms/step | "
            f"peak {M.peak_memory_gib(device):6.2f} GiB")
    peak = next((f for card, f in BF16_FLOPS.items()
                 if device.type == "cuda" and card in torch.cuda.get_device_name(device)), None)
    if peak and dtype == torch.bfloat16:
        print(line + f" | MFU {train_flops(cfg, n_params, seq) * batch * seq / dt / peak:5.1%}")
    else:
        print(line)
    return dt


def compare(rest):
    """`compare REV [--rounds N] -- BENCHMARK ARGS`: the benchmark on the working tree and on commit REV by turns."""
    p = flags.Parser(prog="bench.py compare")
    p.add_argument("rev", help="the commit to compare the working tree with "
                               "(anything git accepts: HEAD, main~3, a hash)")
    p.add_argument("--rounds", type=flags.count, default=3,
                   help="runs of the benchmark on each side, by turns (at least 1)")
    p.add_argument("--their-bench", action="store_true",
                   help="run the commit's own bench.py there, not this one (a commit whose modules this file does "
                        "not know); check that both measure the same thing")
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
            if not args.their_bench:
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
                        hint = "" if args.their_bench or side == "working tree" else " (an older commit: --their-bench)"
                        sys.exit(f"error: compare: the benchmark failed on {side}: "
                                 f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}{hint}")
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
    if argv[:1] in (["-h"], ["--help"]):
        return print(__doc__)
    if not argv or argv[0] not in (*flags.SCRATCH_SHAPES, *MODES):
        sys.exit(f"error: the first argument is a benchmark: a model shape ({', '.join(flags.SCRATCH_SHAPES)}) for RL "
                 f"steps, then any train.py rl flags; or one of {', '.join(MODES)}")
    mode, rest = argv[0], [a for a in argv[1:] if a != "--profile"]
    profile = "--profile" in argv[1:] and mode != "compare"
    try:
        if mode == "compare":
            return compare(argv[1:])
        with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile
              else contextlib.nullcontext()) as prof:
            figures = (bench_sft(rest) if mode == "sft" else bench_sampler(rest) if mode == "sampler"
                       else bench_decoder(rest) if mode == "decoder" else bench_rl(mode, rest))
    except (D.DataError, M.CheckpointError, train.TrainingError) as e:
        sys.exit(f"error: {e}")
    if profile:  # the whole run, warm-up and set-up included; the profiler's own cost inflates the many small operators
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
    if record:
        Path(record).write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
