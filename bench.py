"""The RL step's benchmark: a few RL steps of a random-weight model of a given shape on the embedded
domain, timed phase by phase (the first step, a warm-up, left out).

    python bench.py tiny                        # the tiny default model, 3 steps at the rl defaults
    python bench.py qwen2.5-0.5b --compile      # any train.py rl flag: --prompts-per-step, --mu, ...

The decoder's own benchmark is `python model.py --bench`, the sampler's `python rollout.py --bench`.
"""

import json
import sys
from pathlib import Path

import domain as D
import model as M
import train


def report(args):
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    shapes = ", ".join(train.SCRATCH_SHAPES)
    if not argv or argv[0] not in train.SCRATCH_SHAPES:
        sys.exit(f"error: the first argument is the model's shape ({shapes}), then any train.py rl flags")
    shape, rest = argv[0], argv[1:]
    if any(f.split("=")[0] in ("--stage", "--init", "--data", "--resume") for f in rest):
        sys.exit("error: the benchmark sets --stage, --init and --data itself (a random-weight model, the embedded domain)")
    try:
        args = train.get_args(["--stage", "rl", "--init", "scratch", "--scratch-shape", shape, "--eval-n", "0",
                               "--steps", "3", "--out", f"out/bench-{shape}", *rest])
        train.run_rl(args)
    except (D.DataError, M.CheckpointError, train.TrainingError) as e:
        sys.exit(f"error: {e}")
    report(args)


if __name__ == "__main__":
    main()
