"""train.py --stage ablate: arms from one distilled start, results from their evals, resume, failures."""

import json

import pytest

import train

TINY = ["--budget", "30", "--distill-steps", "3", "--batch-size", "4", "--steps", "2", "--prompts-per-step", "2",
        "--num-generations", "2", "--eval-n", "4", "--max-new-tokens", "12", "--lr", "1e-4", "--no-eaai-partial"]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_flags_of_passes_on_what_differs_from_the_stage_default():
    args = train.get_args(["--stage", "ablate", "--lr", "1e-4", "--no-eaai-partial", "--verdict-gate", "--K", "2"])
    assert train.flags_of(args, train.RL_FLAGS, "rl") == ["--K", "2", "--verdict-gate", "--no-eaai-partial", "--lr", "0.0001"]
    assert train.flags_of(train.get_args(["--stage", "ablate"]), train.RL_FLAGS, "rl") == []  # ablate's rl defaults are rl's
    assert train.flags_of(args, train.DISTILL_FLAGS, "distill") == ["--K", "2"]


def test_ablate_runs_each_arm_from_the_same_start_and_resumes(tmp_path):
    out = tmp_path / "ab"
    train.main(["--stage", "ablate", "--arms", "distill,grpo", "--seeds", "1", "--out", str(out), *TINY])
    runs = lines(out / "runs.jsonl")
    assert [r["key"] for r in runs][0] == ["guided", 0] and sorted(r["key"][0] for r in runs) == ["distill", "grpo", "guided"]
    grpo = next(r for r in runs if r["key"][0] == "grpo")["commands"]
    # the arm's own flags and the ablate command's non-default ones, from the seed's distilled start
    assert f"--init {out / 'seed0' / 'distill'}" in grpo[0] and "--routes none --reward answer" in grpo[0]
    assert "--lr 0.0001" in grpo[0] and "--no-eaai-partial" in grpo[0] and "--steps 2" in grpo[0]
    assert "--stage eval" in grpo[1] and "--eval-n 4" in grpo[1]
    results = lines(out / "results.jsonl")
    assert {(r["arm"], r["split"]) for r in results} == {(a, s) for a in ("distill", "grpo") for s in ("test", "hard")}
    for r in results:  # the table's numbers are the arm's own eval lines
        ev = [e for e in lines(out / "seed0" / r["arm"] / "eval.jsonl") if e["split"] == r["split"]][-1]
        assert (r["acc_autonomous"], r["acc_with_routes"]) == (ev["acc_autonomous"], ev["acc_with_routes"])
    table = (out / "results.md").read_text()
    assert "| grpo | GRPO without routes, answer reward | 1 |" in table and "python train.py --stage ablate" in table
    acc = {(r["arm"], r["split"]): r["acc_autonomous"] for r in results}  # the paired row: grpo minus its start
    assert f"| grpo | {100 * (acc['grpo', 'test'] - acc['distill', 'test']):+.1f} |" in table
    assert len(lines(out / "seed0" / "grpo" / "metrics.jsonl")) == 2  # 2 rl steps, no in-loop eval

    # drop grpo's lines as if the command had been stopped during it: --resume reruns grpo, nothing else
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs if r["key"][0] != "grpo"))
    train.main(["--stage", "ablate", "--out", str(out), "--resume"])
    assert sorted(r["key"][0] for r in lines(out / "runs.jsonl")) == ["distill", "grpo", "guided"]
    assert (out / "seed0" / "distill.log").read_text().count("--stage distill") == 1  # not distilled again
    assert (out / "seed0" / "grpo.log").read_text().count("--stage rl") == 2
    assert "| grpo | GRPO without routes, answer reward | 1 |" in (out / "results.md").read_text()


def test_ablate_bad_input_and_a_failing_run(tmp_path):
    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            train.main(list(argv))
        return str(e.value.code)

    assert fails("--stage", "ablate", "--arms", "grpo,nope", "--out", str(tmp_path / "a")) == \
        f"error: --arms: unknown arm(s) nope (known: {', '.join(train.ARMS)})"
    assert fails("--stage", "eval", "--init", "x", "--eval-splits", "test,train") == \
        "error: --eval-splits: unknown split 'train' (dev, test, hard)"
    assert fails("--stage", "ablate", "--out", str(tmp_path / "b"), "--resume") == f"error: --resume: {tmp_path / 'b' / 'ablate.json'} not found"
    # a distillation that fails (a budget of 0 problems): its arms never start, the error names its log
    msg = fails("--stage", "ablate", "--arms", "grpo", "--seeds", "1", "--out", str(tmp_path / "c"), *TINY, "--budget", "0")
    assert msg.startswith("error: 1 run(s) failed and 1 did not start; first: ") and "no SFT example" in msg
    assert str(tmp_path / "c" / "seed0" / "distill.log") in msg and not (tmp_path / "c" / "results.jsonl").exists()
