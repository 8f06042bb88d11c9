"""ablate.py: arms from one distilled start, flags passed through, results
from their evals, resume, failures."""

import json

import pytest

import ablate
import flags
import train

TINY = ["--budget", "30", "--distill-steps", "3", "--batch-size", "4", "--steps", "2", "--prompts-per-step", "2",
        "--num-generations", "2", "--eval-n", "4", "--max-new-tokens", "12", "--lr", "1e-4", "--no-eaai-partial"]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_new_rl_flag_reaches_every_arm_untouched(tmp_path, monkeypatch):
    """No list of flags is kept by hand: a flag train.py gains reaches every arm's rl and eval commands as
    written; the distillation gets the flags outside flags.py's rl and optimization groups."""
    table = {**flags.FLAGS, "rl": [*flags.FLAGS["rl"], ("--new-rl-flag", float, 0.0, "a flag added to the table")]}
    monkeypatch.setattr(flags, "FLAGS", table)
    argv = ["--arms", "distill,grpo,realm", "--seeds", "2", "--new-rl-flag", "0.25", "--K", "2", "--lr", "1e-4"]
    args, rest, rl = ablate.get_args(argv)
    assert rest == ["--new-rl-flag", "0.25", "--K", "2", "--lr", "1e-4"] and rl.new_rl_flag == 0.25 and rl.steps == 60
    runs = ablate.runs_of(args, rest, rl, tmp_path)
    assert [r.key for r in runs] == [("guided", 0), ("distill", 0), ("grpo", 0), ("realm", 0),
                                     ("guided", 1), ("distill", 1), ("grpo", 1), ("realm", 1)]
    for r in runs:
        for cmd in r.cmds:
            text = " ".join(cmd)
            if "--stage distill" in text:  # the data's flags, not the arms' RL settings
                assert "--K 2" in text and "--new-rl-flag" not in text and "--lr" not in text
            else:
                assert "--new-rl-flag 0.25 --K 2 --lr 1e-4" in text
    grpo_rl = " ".join(runs[2].cmds[0])
    assert grpo_rl.endswith("--routes none --reward answer") and "--steps 60" in grpo_rl  # the arm's flags last
    assert ablate.get_args(argv + ["--steps", "7"])[2].steps == 7  # the budget is any rl flag too


def test_ablate_runs_each_arm_from_the_same_start_and_resumes(tmp_path):
    out = tmp_path / "ab"
    ablate.main(["--arms", "distill,grpo", "--seeds", "1", "--eval-splits", "test,hard",
                "--out", str(out), *TINY])
    runs = lines(out / "runs.jsonl")
    assert [r["key"] for r in runs][0] == ["guided", 0]
    assert sorted(r["key"][0] for r in runs) == ["distill", "grpo", "guided"]
    grpo = next(r for r in runs if r["key"][0] == "grpo")["commands"]
    # the arm's own flags and the ablate command's other flags, from the seed's distilled start
    assert f"--init {out / 'seed0' / 'distill'}" in grpo[0] and "--routes none --reward answer" in grpo[0]
    assert "--lr 1e-4" in grpo[0] and "--no-eaai-partial" in grpo[0] and "--steps 2" in grpo[0]
    assert "--stage eval" in grpo[1] and "--eval-n 4" in grpo[1]
    results = lines(out / "results.jsonl")
    assert {(r["arm"], r["split"]) for r in results} == {(a, s) for a in ("distill", "grpo") for s in ("test", "hard")}
    for r in results:  # the table's numbers are the arm's own eval lines (exact: copied, not recomputed)
        ev = [e for e in lines(out / "seed0" / r["arm"] / "eval.jsonl") if e["split"] == r["split"]][-1]
        assert (r["acc_autonomous"], r["acc_with_routes"], r["n"]) == (ev["acc_autonomous"], ev["acc_with_routes"], 4)
        assert r["verdict_acc"] == ev["verdict_acc"] and 0 <= r["verdict_acc"] <= 1
        parts = {k: v for k, v in ev.items()
                 if k.endswith(("_taught", "_route_only")) or k.startswith("n_") or k == "route_only"}
        assert "acc_with_routes_route_only" in parts and all(r[k] == v for k, v in parts.items())  # each part, copied
        assert r["right_autonomous"] == ev["right_autonomous"]
        assert r["right_autonomous"].count("1") == 4 * r["acc_autonomous"]
        assert ((r["updates"], r["autonomous_updates"]) == ((2, 0) if r["arm"] == "grpo" else (0, 0))
                or r["arm"] == "grpo")
    grpo_row = next(r for r in results if r["arm"] == "grpo")  # no routes at all: every update autonomous
    lrs = [m["lr"] for m in lines(out / "seed0" / "grpo" / "metrics.jsonl")]
    # exact: ablate sums the same lr values read from the same file, in the same order
    assert (grpo_row["updates"], grpo_row["autonomous_updates"], grpo_row["autonomous_lr_sum"]) == (2, 2, sum(lrs))
    table = (out / "results.md").read_text()
    assert "| grpo | GRPO without routes, answer reward | 1 |" in table and "python ablate.py --arms" in table
    acc = {(r["arm"], r["split"]): r["acc_autonomous_taught"] for r in results}  # the paired row: grpo minus its start
    assert "Each arm minus distill, test, paired by seed and problem" in table
    start = next(r for r in results if r["arm"] == "distill" and r["split"] == "test")  # does the start read routes
    gain = lambda part: 100 * (start[f"acc_with_routes_{part}"] - start[f"acc_autonomous_{part}"])
    assert f"The start, test: with routes minus alone taught {gain('taught'):+.1f} [" in table
    assert f"; route-only {gain('route_only'):+.1f} [" in table
    assert f"| grpo | 1 | {100 * (acc['grpo', 'test'] - acc['distill', 'test']):+.1f} [" in table  # taught alone, first
    n = (start["n_taught"], start["n_route_only"])
    assert ("Each arm minus grpo" in table and "| 2.0 (" in table
            and f"## test: 4 problems ({n[0]} taught, {n[1]} route-only)" in table)
    assert "## hard: 4 problems" in table and "ReaLM's links" not in table  # grpo's 2 autonomous updates; no realm arm
    assert len(lines(out / "seed0" / "grpo" / "metrics.jsonl")) == 2  # 2 rl steps, no in-loop eval

    # drop grpo's lines as if the command had been stopped during it: --resume reruns grpo, nothing else
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs if r["key"][0] != "grpo"))
    ablate.main(["--out", str(out), "--resume"])
    assert sorted(r["key"][0] for r in lines(out / "runs.jsonl")) == ["distill", "grpo", "guided"]
    assert (out / "seed0" / "distill.log").read_text().count("--stage distill") == 1  # not distilled again
    assert (out / "seed0" / "grpo.log").read_text().count("--stage rl") == 2
    assert "| grpo | GRPO without routes, answer reward | 1 |" in (out / "results.md").read_text()


def test_paired_ci():
    # exact: means of 0 / 1 differences are sums of integers (exact in float64) over counts: 0, 1, 750 / 3000
    same = {0: "0110", 1: "1001"}
    assert ablate.paired_ci(same, same) == (0.0, 0.0, 0.0, 2, 0.0, 0.0)
    one = ablate.paired_ci({0: "1111", 1: "1111"}, {0: "0000", 2: "0000"})  # seed 0 only: no t interval
    assert one == (100.0, 100.0, 100.0, 1, None, None) and ablate.ci_text(one) == "+100.0 [+100.0, +100.0]"
    assert ablate.paired_ci({0: "11"}, {1: "00"}) is None
    mean, low, high, seeds, *_ = ablate.paired_ci({s: "1100" * 250 for s in range(3)},
                                                  {s: "1000" * 250 for s in range(3)})
    assert (mean, seeds) == (25.0, 3) and 20 < low < 25 < high < 30  # problems' sampling: one std error ~1.4 points


def test_t_interval_over_seeds():
    """Per-seed differences +50, +25, 0 points: mean 25, sample std 25, t(0.975, 2) = 4.3027 (a table's value),
    so 25 -/+ 4.3027 * 25 / sqrt(3) = [-37.1, +87.1]; the bootstrap, treating three seeds as many, is narrower."""
    a = {0: "1100", 1: "1000", 2: "0000"}
    b = {0: "0000", 1: "0000", 2: "0000"}
    d = ablate.paired_ci(a, b)
    assert d.mean == 25.0 and d.seeds == 3
    assert d.t_low == pytest.approx(-37.105, abs=0.01) and d.t_high == pytest.approx(87.105, abs=0.01)
    assert d.t_low < d.low and d.high < d.t_high
    assert ablate.ci_text(d) == f"+25.0 [-37.1, +87.1] (bootstrap [{d.low:+.1f}, {d.high:+.1f}])"
    for df, table in ((1, 12.706), (4, 2.776), (9, 2.262), (30, 2.042)):  # Student's t, 97.5 %
        assert ablate.t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)


def test_ablate_bad_input_and_a_failing_run(tmp_path):
    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            ablate.main(list(argv))
        return str(e.value.code)

    assert fails("--arms", "grpo,nope", "--out", str(tmp_path / "a")) == \
        f"error: --arms: unknown arm(s) nope (known: {', '.join(ablate.ARMS)})"
    assert fails("--eval-splits", "test,train") == "error: --eval-splits: unknown split 'train' (dev, test, hard)"
    assert fails("--seeds", "0") == "error: argument --seeds: must be >= 1 (got 0)"
    assert fails("--temperature", "-1") == "error: argument --temperature: must be > 0 (got -1)"  # a train.py flag
    assert fails("--no-such-flag") == "error: unrecognized arguments: --no-such-flag"
    assert fails("--init", "x") == "error: --init: the ablation sets it for each run (it runs on the embedded domain)"
    assert fails("--show", "3") == \
        "error: --show: is for train.py --stage eval (the ablation's evaluations score every problem)"
    assert fails("--out", str(tmp_path / "b"), "--resume") == \
        f"error: --resume: {tmp_path / 'b' / 'ablate.json'} not found"
    # a distillation that fails (a budget of 0 problems): its arms never start, the error names its log
    msg = fails("--arms", "grpo", "--seeds", "1", "--out", str(tmp_path / "c"), *TINY, "--budget", "0")
    assert msg.startswith("error: 1 run(s) failed and 1 did not start; first: ") and "no SFT example" in msg
    assert str(tmp_path / "c" / "seed0" / "distill.log") in msg and not (tmp_path / "c" / "results.jsonl").exists()


def test_quick_evaluates_on_test_and_the_longest_runs_start_first(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "DEFAULT_START", tmp_path / "no-start")  # no distillation made before: it runs here
    args, rest, rl = ablate.get_args(["--quick"])
    assert (args.seeds, args.arms, args.splits, args.reused) == (1, list(ablate.QUICK_ARMS), ["test"], {})
    assert ablate.get_args([])[0].splits == ["test"]
    assert ablate.get_args(["--quick", "--eval-splits", "dev"])[0].splits == ["dev"]
    assert args.distill_steps == ablate.get_args([])[0].distill_steps == flags.STAGE_DEFAULTS["distill"]["steps"]
    assert (rl.steps, ablate.get_args([])[2].steps,
            ablate.get_args(["--quick", "--steps", "9"])[2].steps) == (ablate.QUICK_RL_STEPS, 60, 9)
    assert ablate.get_args([])[0].arms == list(ablate.DEFAULT_ARMS) and ablate.get_args([])[0].seeds == 5
    runs = ablate.runs_of(args, rest, rl, tmp_path)
    assert [r.key[0] for r in sorted(runs, key=ablate.order)] == ["guided", "cot-synth", "realm", "grpo", "distill"]
    assert not any("--eval-every" in c for r in runs for c in r.cmds[0])  # no link evaluations in the quick ablation


def test_quick_reuses_the_default_start_only_when_it_is_the_same_distillation(tmp_path, monkeypatch):
    """--quick starts from out/distill when it holds the distillation the ablation would run (same seed, same flags but
    for those that do not change what it trains): no distillation runs, every arm starts from it at once."""
    start = tmp_path / "distill"
    monkeypatch.setattr(ablate, "DEFAULT_START", start)
    start.mkdir()
    (start / "config.json").write_text("{}")

    def made_by(*argv):
        import torch
        saved = vars(flags.parse(["--stage", "distill", *argv]))
        torch.save({"stage": "distill", "args": saved}, start / "trainer_state.pt")
        return ablate.get_args(["--quick"])

    args, rest, rl = made_by("--device", "cpu", "--eval-every", "100")  # what train.py --stage rl runs, and a look
    assert args.reused == {0: start}
    runs = ablate.runs_of(args, rest, rl, tmp_path / "ab")
    assert [r.key for r in runs] == [(a, 0) for a in ablate.QUICK_ARMS] and all(r.needs is None for r in runs)
    assert all(f"--init {start}" in " ".join(r.cmds[0]) for r in runs)  # distill: its eval; the others: rl from it
    assert made_by("--seed", "1")[0].reused == {}  # another seed
    assert made_by("--steps", "100")[0].reused == {}  # another recipe
    made_by()
    assert ablate.get_args(["--quick", "--K", "2"])[0].reused == {}  # --K shapes the distillation's data
    assert ablate.get_args(["--quick", "--lr", "1e-4"])[0].reused == {0: start}  # --lr is the arms' RL setting
    assert ablate.get_args([])[0].reused == {}  # the full ablation distils every seed itself


def test_runs_start_seed_by_seed_and_realm_measures_its_links(tmp_path):
    args, rest, rl = ablate.get_args(["--arms", "grpo,realm", "--seeds", "2", "--steps", "30", "--eaai-decay", "0.5"])
    runs = ablate.runs_of(args, rest, rl, tmp_path)
    assert [r.key for r in sorted(runs, key=ablate.order)] == [("guided", 0), ("realm", 0), ("grpo", 0),
                                                                ("guided", 1), ("realm", 1), ("grpo", 1)]
    realm_rl, grpo_rl = (next(r for r in runs if r.key == (a, 0)).cmds[0] for a in ("realm", "grpo"))
    assert ablate.handover(rl) == 15
    assert realm_rl[-6:] == ["--eval-every", "5", "--eval-n", "1000", "--eval-splits", "test"]
    assert "--eval-every" not in grpo_rl and grpo_rl[grpo_rl.index("--eval-n") + 1] == "0"
    got = flags.parse(realm_rl[2:])  # the command as train.py reads it: the arm's flags win
    assert (got.eval_every, got.eval_n, got.eval_splits, got.steps) == (5, 1000, "test", 30)


def test_the_table_compares_route_only_problems_and_shows_realms_links(tmp_path):
    """Hand-written result lines: the paper's comparisons read the route-only problems alone (a taught problem
    that would change them is left out), and ReaLM's links come from its RL run's evaluation lines."""
    args, rest, rl = ablate.get_args(["--arms", "distill,grpo,cot-synth,realm", "--seeds", "2",
                                      "--eval-splits", "test"])
    right = {"distill": ("1100", "1101"), "grpo": ("1100", "1100"), "cot-synth": ("1110", "1110"),
             "realm": ("0111", "0011")}
    for s in range(2):
        for arm, (alone, routes) in right.items():
            acc = lambda bits, part: bits[2:].count("1") / 2 if part == "route_only" else bits[:2].count("1") / 2
            train.log(tmp_path / "results.jsonl", arm=arm, seed=s, split="test", n=4, route_only="0011", n_taught=2,
                      n_route_only=2, right_autonomous=alone, right_with_routes=routes,
                      acc_autonomous=alone.count("1") / 4, acc_with_routes=routes.count("1") / 4, verdict_acc=0.5,
                      verdict_acc_own_right=0.75 - s / 2, verdict_acc_own_wrong=None if arm == "grpo" else 0.25,
                      step_acc=0.5, autonomous_updates=0, autonomous_lr_sum=0.0,
                      **{f"acc_{k}_{p}": acc(b, p) for k, b in (("autonomous", alone), ("with_routes", routes))
                         for p in ("taught", "route_only")},
                      **{f"verdict_acc_{p}": 0.5 for p in ("taught", "route_only")})
            train.log(tmp_path / "runs.jsonl", key=[arm, s], minutes=1.0)
        (tmp_path / f"seed{s}" / "realm").mkdir(parents=True)
        for step in (0, 12, 24, 36, 48, 60):  # the realm arm's evaluations during RL, with an rl line between them
            train.log(tmp_path / f"seed{s}" / "realm" / "metrics.jsonl", step=step, split="test",
                      acc_with_routes_route_only=step / 100 + s / 10,
                      verdict_acc_route_only=0.5, acc_autonomous_route_only=0.0, acc_autonomous_taught=1.0)
            train.log(tmp_path / f"seed{s}" / "realm" / "metrics.jsonl", stage="rl", step=step + 1, reward=0.5)
    paper = ablate.write_table(tmp_path, args, rl, "python ablate.py")
    table = (tmp_path / "results.md").read_text()
    assert len(paper) == 2 and all(f"**{line}**." in table for line in paper)  # what the ablation prints at its end
    # verdicts by own answer: seeds 0 and 1 give 0.75 and 0.25 (mean 50, std 35.4); grpo had no wrong own answer
    assert "| realm | 50.0 ± 35.4 | 25.0 ± 0.0 | 50.0 ± 0.0 |" in table
    assert "| grpo | 50.0 ± 35.4 | - | 50.0 ± 0.0 |" in table
    # route-only with routes: realm '11', '11' against cot-synth '10', '10' (all four problems: realm 3/4 + 2/4
    # against 3/4 + 3/4)
    assert "**realm minus cot-synth, test route-only problems with routes: +50.0 [" in table
    # '11' against '00'
    assert ("**realm minus grpo, test route-only problems alone: +100.0 [+100.0, +100.0] (bootstrap [+100.0, "
            "+100.0]) points (paired over 2 seed(s))**." in table)
    # minus distill, taught: '01', '00' against '11', '11'
    assert "| realm | 2 | -50.0 [" in table and "| -100.0 [-100.0, -100.0] (bootstrap [-100.0, -100.0]) |" in table
    assert "EAAI's signal reaches 0 at step 36" in table
    # (0.36, 0.46): std 0.0707
    assert "| 36 | hand-over | 2 | 41.0 ± 7.1 | 50.0 ± 0.0 | 0.0 ± 0.0 | 100.0 ± 0.0 |" in table
    assert "| 0 | the start (after SFT) | 2 |" in table and "| 24 | routes shown |" in table and "| 60 | end |" in table
