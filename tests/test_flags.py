"""Every bad flag ends in one line naming it and a non-zero exit, before any work is done."""

import subprocess
import sys
from pathlib import Path

import pytest

import ablate
import bench
import flags
import train

BAD = [  # (command line, what the one line says; "..." ends a prefix: argparse words its choices by Python version)
    (["--stage", "rl", "--steps", "-3"], "error: argument --steps: must be >= 1 (got -3)"),
    (["--stage", "distill", "--steps", "0"], "error: argument --steps: must be >= 1 (got 0)"),
    (["--stage", "rl", "--steps", "ten"], "error: argument --steps: invalid int value: 'ten'"),
    (["--stage", "distill", "--batch-size", "0"], "error: argument --batch-size: must be >= 1 (got 0)"),
    (["--stage", "rl", "--num-generations", "1"],
     "error: --num-generations must be >= 2 for grpo (a group of 1 has zero advantage) (got 1)"),
    (["--stage", "rl", "--algo", "rft", "--num-generations", "0"],
     "error: argument --num-generations: must be >= 1 (got 0)"),
    (["--stage", "rl", "--prompts-per-step", "0"], "error: argument --prompts-per-step: must be >= 1 (got 0)"),
    (["--stage", "rl", "--num-minibatches", "9"],
     "error: --num-minibatches must be at most --prompts-per-step (got 9)"),
    (["--stage", "rl", "--epsilon", "-1"], "error: argument --epsilon: must be >= 0 and <= 1 (got -1)"),
    (["--stage", "rl", "--epsilon-high", "-0.1"], "error: argument --epsilon-high: must be >= 0 (got -0.1)"),
    (["--stage", "rl", "--temperature", "0"], "error: argument --temperature: must be > 0 (got 0)"),
    (["--stage", "rl", "--lr", "0"], "error: argument --lr: must be > 0 (got 0)"),
    (["--stage", "rl", "--beta", "-1"], "error: argument --beta: must be >= 0 (got -1)"),
    (["--stage", "rl", "--mu", "0"], "error: argument --mu: must be >= 1 (got 0)"),
    (["--stage", "distill", "--mrpv-share", "1.5"], "error: argument --mrpv-share: must be >= 0 and <= 1 (got 1.5)"),
    (["--stage", "distill", "--mrpv-from", "-0.1"], "error: argument --mrpv-from: must be >= 0 and <= 1 (got -0.1)"),
    (["--stage", "distill", "--drills", "-1"], "error: argument --drills: must be >= 0 (got -1)"),
    (["--stage", "distill", "--reading", "2"], "error: argument --reading: must be >= 0 and <= 1 (got 2)"),
    (["--stage", "distill", "--route-rule", "R6"],
     "error: argument --route-rule: invalid choice: 'R6' (choose from ..."),
    (["--stage", "rl", "--neg-share", "-0.5"], "error: argument --neg-share: must be >= 0 and <= 1 (got -0.5)"),
    (["--stage", "rl", "--eaai-decay", "2"], "error: argument --eaai-decay: must be >= 0 and <= 1 (got 2)"),
    (["--stage", "rl", "--eaai-hold", "0.5", "--eaai-decay", "0.6"],
     "error: --eaai-decay plus --eaai-hold must be at most 1 (both are shares of the steps) (got 0.6)"),
    (["--stage", "rl", "--fresh-problems"], "error: unrecognized arguments: --fresh-problems"),
    (["--stage", "rl", "--K", "0"], "error: argument --K: must be >= 1 (got 0)"),
    (["--stage", "rl", "--w-verdict", "-1"], "error: argument --w-verdict: must be >= 0 (got -1)"),
    (["--stage", "rl", "--max-new-tokens", "0"], "error: argument --max-new-tokens: must be >= 1 (got 0)"),
    (["--stage", "eval", "--eval-n", "-1"], "error: argument --eval-n: must be >= 0 (got -1)"),
    (["--stage", "eval", "--eval-splits", "test,train"],
     "error: --eval-splits: unknown split 'train' (dev, test, hard)"),
    (["--stage", "eval", "--eval-splits", ","], "error: --eval-splits: no split given (dev, test, hard)"),
    (["--stage", "rl", "--device", "gpu0"], "error: --device 'gpu0' is not a device (auto, cpu, cuda, cuda:N)"),
    (["--stage", "rl", "--loss-type", "group"],
     "error: argument --loss-type: invalid choice: 'group' (choose from ..."),
    (["--stage", "train"], "error: argument --stage: invalid choice: 'train' (choose from ..."),
    (["--steps", "3"], "error: the following arguments are required: --stage"),
    (["--stage", "rl", "--no-such-flag"], "error: unrecognized arguments: --no-such-flag"),
    (["--stage", "ablate"], "error: argument --stage: invalid choice: 'ablate' (choose from ..."),
]
BAD_ABLATE = [
    (["--arms", "grpo,nope"], f"error: --arms: unknown arm(s) nope (known: {', '.join(ablate.ARMS)})"),
    (["--jobs", "0"], "error: argument --jobs: must be >= 1 (got 0)"),
    (["--quick", "--eval-splits", ""], "error: --eval-splits: no split given (dev, test, hard)"),
    (["--temperature", "0"], "error: argument --temperature: must be > 0 (got 0)"),
    (["--stage", "rl"], "error: --stage: the ablation sets it for each run (it runs on the embedded domain)"),
]


@pytest.mark.parametrize("main, argv, line", [(train.main, a, x) for a, x in BAD]
                         + [(ablate.main, a, x) for a, x in BAD_ABLATE],
                         ids=[" ".join(a) for a, _ in BAD] + ["ablate " + " ".join(a) for a, _ in BAD_ABLATE])
def test_a_bad_flag_is_one_line(main, argv, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder stays empty
    with pytest.raises(SystemExit) as e:
        main(argv)
    said = str(e.value.code)
    assert said.startswith(line[:-3]) if line.endswith("...") else said == line
    assert "\n" not in said and list(tmp_path.iterdir()) == []


def test_torchrun_processes_must_divide_the_prompts(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "rl", "--prompts-per-step", "8"])
    assert str(e.value.code) == "error: --prompts-per-step is not a multiple of the 3 processes (got 8)"


def test_bench_refuses_an_unknown_shape():
    with pytest.raises(SystemExit) as e:
        bench.main(["huge"])
    assert str(e.value.code) == (
        "error: the first argument is a benchmark: a model shape (tiny, qwen2.5-0.5b, qwen2.5-1.5b) "
        "for RL steps, then any train.py rl flags; or one of sft, sampler, decoder, compare")


@pytest.mark.parametrize("argv, message", [
    (["compare", "no-such-commit", "--", "tiny"],
     "error: compare: 'no-such-commit' is not a commit of the repository at"),
    (["compare", "HEAD"], "error: compare: name the benchmark after --, e.g. `python bench.py compare HEAD -- tiny`"),
    (["sft", "--steps", "3"], "error: the sft benchmark sets --stage, --steps and --eval-n itself"),
    (["compare", "HEAD", "--rounds", "0", "--", "sft"], "error: argument --rounds: must be >= 1 (got 0)"),
    (["sampler", "--batch", "x"], "error: argument --batch: "),
])
def test_bench_refuses_bad_comparisons_in_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert str(e.value.code).startswith(message) and "\n" not in str(e.value.code)


def test_from_the_shell_one_line_on_stderr_and_exit_1(tmp_path):
    script = Path(train.__file__)
    p = subprocess.run([sys.executable, str(script), "--stage", "rl", "--steps", "-3"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "error: argument --steps: must be >= 1 (got -3)\n")
    assert not (tmp_path / "out").exists()  # the distill stage did not run first


def test_each_stage_has_its_own_defaults():
    """The distillation decays its learning rate, RL holds it (equal rates for every arm's updates); a flag wins."""
    distill, rl = flags.parse(["--stage", "distill"]), flags.parse(["--stage", "rl"])
    got = (distill.lr_schedule, distill.steps, distill.batch_size, distill.lr, distill.mrpv_from)
    assert got == ("cosine", 1200, 32, 2e-3, 0.0)
    assert (rl.lr_schedule, rl.steps, rl.lr) == ("constant", 120, 3e-5)
    assert flags.parse(["--stage", "rl", "--lr-schedule", "cosine"]).lr_schedule == "cosine"
    assert flags.parse(["--stage", "rl", "--data", "x.jsonl"]).lr == flags.PRETRAINED_LR["rl"]
    assert flags.parse(["--stage", "distill", "--init", "some/folder"]).lr == flags.PRETRAINED_LR["distill"]
    lrs = [train.lr_at(s, rl) for s in range(rl.steps)]
    assert lrs[rl.warmup:] == [rl.lr] * (rl.steps - rl.warmup) and lrs[0] < rl.lr


def test_drills_only_where_they_fit():
    """Reading drills need the embedded domain's route-only rule and the guided teacher; verdict drills the
    embedded domain (train.reads, train.drills)."""
    args = lambda *a: flags.parse(["--stage", "distill", *a])
    assert train.reads(args()) and train.drills(args()) == 32
    assert (not train.reads(args("--unguided")) and not train.reads(args("--route-rule", "none"))
            and not train.reads(args("--reading", "0")))
    assert train.drills(args("--drills", "0")) == 0 and train.drills(args("--drills", "5")) == 5
    assert not train.reads(args("--data", "x.jsonl")) and train.drills(args("--data", "x.jsonl")) == 0


def test_the_flag_table_is_what_argparse_reads():
    """Each row of flags.FLAGS is one flag of its group; in_groups names the arms' RL settings for ablate.py."""
    ap = flags.parser("rl")
    parsed = {a.option_strings[0] for a in ap._actions if a.option_strings and a.dest != "help"}
    rows = [flag for group in flags.FLAGS.values() for flag, *_ in group]
    assert len(rows) == len(set(rows)) and set(rows) == parsed
    assert {"--lr", "--beta", "--steps"} <= flags.in_groups("rl", "optimization")
    assert not {"--seed", "--K", "--init"} & flags.in_groups("rl", "optimization")
