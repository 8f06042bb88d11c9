import json
from pathlib import Path

import pytest
import torch

import model as M
from grpo import component_advantages, group_advantages, grpo_loss, sequence_logprobs, token_advantages
from rollout import generate
from tokenizer import build_tokenizer, load_tokenizer


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, n=4)
    # +-0.5 / (std 0.5 + eps 1e-4) = +-0.9998: atol 1e-3 allows the eps (2e-4), not a wrong mean or std
    assert torch.allclose(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3, rtol=0)
    assert torch.equal(a[4:], torch.zeros(4))  # an all-equal group carries no signal; exact: 0.5 - mean 0.5 is 0
    # float32 against exact halves: rtol 1e-6 is ~10 float32 roundings (means of 0 / 1 are exact anyway)
    assert torch.allclose(group_advantages(r, n=4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]),
                          rtol=1e-6, atol=0)


def test_component_advantages_keep_verdict_luck_off_the_chain():
    """A group where every answer is wrong and only the verdicts vary: one advantage per sample pushes the
    chain's tokens by verdict luck; per component, the chain's tokens get 0 and the verdict lines all of it."""
    nan = float("nan")
    parts = {"answer": torch.zeros(4), "verdict": torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]), "step": torch.full((4,), nan),
             "format": torch.ones(4)}
    w = {"answer": 1.0, "verdict": 0.5, "step": 0.5, "format": 0.1}
    adv = component_advantages(parts, w, n=4)
    assert set(adv) == {"answer", "verdict", "format"} and torch.equal(adv["answer"], torch.zeros(4))
    on_verdict = [False, False, True, True]
    a = [token_advantages(adv, w, i, on_verdict) for i in range(4)]
    assert all(x[0] == x[1] == 0.0 for x in a)  # the chain's tokens: no signal from the verdicts (exact: sums of zeros)
    v = [x[2] for x in a]
    assert v == sorted(v) and v[0] < 0 < v[-1] and all(x[2] == x[3] for x in a)  # x[2], x[3]: one value, twice
    # below: Python floats from the same float32 advantage, weighted in another order: ~1e-16 apart; rel 1e-12
    # weighted mean of verdict and format
    assert v[-1] == pytest.approx(0.5 * float(adv["verdict"][3]) / 0.6, rel=1e-12)
    # the answer's weight on the chain is the same whatever is shown: with or without verdicts
    alone = component_advantages({"answer": torch.tensor([1.0, 0, 0, 1]), "format": torch.ones(4)}, w, n=4)
    assert token_advantages(alone, w, 0, [False])[0] == pytest.approx(float(alone["answer"][0]) / 1.1, rel=1e-12)


def test_per_token_advantages_equal_per_sample_when_constant(policy):
    prompts, samples = rollout(policy, 1.0)
    logp, mask = sequence_logprobs(policy, prompts, [s.tokens for s in samples], pad_id=0)
    old = logp.detach() + 0.05 * torch.randn_like(logp)
    adv = torch.randn(len(samples))
    a, _ = grpo_loss(logp, old, adv, mask)
    b, _ = grpo_loss(logp, old, adv[:, None].expand_as(logp), mask)
    # a broadcast against an expanded view: the same products and sums (identical as measured); rtol 1e-6
    # allows a few float32 roundings of this O(1) loss
    assert torch.allclose(a, b, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = M.tiny_config(40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    return M.Transformer(cfg)


def rollout(policy, temperature):
    prompts = [[3, 4, 5], [6] * 9, [7, 8]]
    samples = generate(policy, prompts, n=2, max_new_tokens=6, temperature=temperature, eos_ids=[1], seed=0)
    return [prompts[s.prompt_index] for s in samples], samples


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ratio_is_one_on_policy_and_the_gradient_is_reinforce(policy, temperature):
    prompts, samples = rollout(policy, temperature)
    completions = [s.tokens for s in samples]
    logp, mask = sequence_logprobs(policy, prompts, completions, pad_id=0, temperature=temperature)
    old = torch.zeros_like(logp)
    for i, s in enumerate(samples):
        old[i, :len(s.logprobs)] = torch.tensor(s.logprobs)
    # the sampler's log-probs are the training forward's: a cached, batched sampler against one padded
    # forward, float32 sums in another order: ~5e-7 apart on log-probs down to -4; 1e-5 is 20x that
    assert ((logp - old).abs() * mask).max() <= 1e-5
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, 0.0])

    policy.zero_grad()
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    ours = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    logp2, _ = sequence_logprobs(policy, prompts, completions, pad_id=0, temperature=temperature)
    (-(adv[:, None] * logp2 * mask).sum() / mask.sum()).backward()  # REINFORCE, same token mean
    # another loss graph over the same forward: at ratio exactly 1 the same gradient up to float32
    # rounding (identical as measured); on gradients up to 0.25, atol 1e-6 (~70 ulps) and rtol 1e-5
    for a, b in zip(ours, (p.grad for p in policy.parameters())):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert stats["clip_frac"] == 0.0 and stats["kl"] == 0.0  # exact: logp - logp is 0, so the ratio is exactly 1


def test_clip_engages_where_it_should():
    mask = torch.ones(4, 1)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_()  # ratios 1.5, 1.5, 0.5, 0.5
    loss, stats = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    loss.backward()
    g = logp.grad[:, 0]
    # ratio above 1 + eps with A > 0, or below 1 - eps with A < 0: clipped, no gradient
    assert g[0] == 0 and g[3] == 0 and g[1] != 0 and g[2] != 0  # exact: the clipped branch has no gradient at all
    assert stats["clip_frac"] == 0.5  # exact: 2 of 4
    # float32 (exp of log 1.5, 1 + 0.2) against float64: ~1e-7 relative; rel 1e-6 is 10x that
    assert loss.item() == pytest.approx(-(1.2 * 1 + 1.5 * -1 + 0.5 * 1 + 0.8 * -1) / 4, rel=1e-6)


def test_all_equal_groups_give_no_policy_gradient(policy):
    prompts, samples = rollout(policy, 1.0)
    logp, mask = sequence_logprobs(policy, prompts, [s.tokens for s in samples], pad_id=0)
    adv = group_advantages(torch.tensor([0.7] * 6), n=2)
    policy.zero_grad()
    grpo_loss(logp, logp.detach(), adv, mask)[0].backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.parameters())


def test_k3_kl_and_aggregation():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1], [0.2, 0.9, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    zero = torch.zeros(2)
    _, s = grpo_loss(logp, logp, zero, mask, beta=0.1, ref_logp=logp)
    assert s["kl"] == 0.0  # policy == reference; exact: exp(0) - 0 - 1
    loss, s = grpo_loss(logp, logp, zero, mask, beta=1.0, ref_logp=logp + 0.5)
    k3 = torch.exp(torch.tensor(0.5)) - 0.5 - 1
    # below: float32 sums and means against the value they average: ~1e-7 relative; rel 1e-6 is 10x that
    assert s["kl"] == pytest.approx(float(k3), rel=1e-6) and loss.item() == pytest.approx(float(k3), rel=1e-6)
    adv = torch.tensor([1.0, 2.0])
    token, _ = grpo_loss(logp, logp, adv, mask, loss_type="token")
    seq, _ = grpo_loss(logp, logp, adv, mask, loss_type="sequence")
    assert token.item() == pytest.approx(-(1 * 2 + 2 * 3) / 5, rel=1e-6)
    assert seq.item() == pytest.approx(-(1 + 2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, logp, adv, mask, loss_type="group")


def test_rl_steps_run_and_log_every_contract_key(tmp_path, capsys):
    import json

    import train

    out = tmp_path / "distill"
    train.main(["--stage", "distill", "--out", str(out), "--steps", "5", "--batch-size", "4", "--budget", "30",
                "--eval-n", "21", "--max-new-tokens", "8"])
    train.main(["--stage", "rl", "--init", str(out), "--out", str(tmp_path / "rl"), "--steps", "3",
                "--prompts-per-step", "2", "--num-generations", "3", "--eval-n", "21", "--max-new-tokens", "12"])
    last = capsys.readouterr().out.strip().splitlines()[-2:]  # the run's last lines: before and after, alone
    assert [x.split(":")[0] for x in last] == ["rl", "rl"]
    assert last[0].startswith("rl: dev, route-only problems alone: ") and " -> " in last[0]
    assert last[1].startswith("rl: test, route-only problems alone: ") and "(with routes " in last[1]
    train.main(["--stage", "rl", "--init", str(out), "--out", str(tmp_path / "rl2"), "--steps", "2",
                "--order", "verify-solve", "--advantages", "sample", "--no-consistent", "--eaai-shape", "linear",
                "--prompts-per-step", "2", "--num-generations", "3", "--eval-n", "0", "--max-new-tokens", "12"])
    assert [json.loads(x)["step"] for x in (tmp_path / "rl2" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "rl"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"step", "loss", "reward", "hint", "reward_answer", "reward_format", "clip_frac", "kl", "entropy",
                "zero_adv_groups", "response_len"} <= r.keys()
        assert 0 <= r["reward"] <= 1 and 0 <= r["hint"] <= 1
    assert steps[0]["hint"] == 1.0 and steps[-1]["hint"] < 1.0
    evals = [(r["step"], r["split"]) for r in rows if "split" in r]
    assert evals == [(0, "dev"), (0, "test"), (3, "dev"), (3, "test")]
    assert (tmp_path / "rl" / "trainer_state.pt").is_file() and (tmp_path / "rl" / "model.safetensors").is_file()


def test_rl_without_a_route_bank_says_which_command_makes_one(tmp_path):
    import train

    tok = build_tokenizer(["A"])
    M.save_model(M.Transformer(M.tiny_config(tok.vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1)),
                 tmp_path / "ckpt", tok)
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "rl", "--init", str(tmp_path / "ckpt"), "--out", str(tmp_path / "rl")])
    assert "no route bank (python train.py --stage distill writes one" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "rl", "--out", str(tmp_path / "nothing"), "--resume"])
    assert "trainer_state.pt not found" in str(e.value.code)


# ---- the RL loop's machinery: resume, torchrun, the reference model, bad steps, the arms ----

RL_FLAGS = ["--steps", "4", "--prompts-per-step", "2", "--num-generations", "3", "--eval-n", "0",
            "--max-new-tokens", "10", "--save-every", "2"]


def varied_reward(completion, problem, routes, w=None, free_form=False, order=None):
    """A reward that varies with the completion whatever the model's skill, so every group carries signal."""
    import mrpv

    x = len(completion) % 7 / 6
    return mrpv.Reward(answer=float(x > 0.5), verdict=None, step=None, format=x, total=x)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    import train

    out = tmp_path_factory.mktemp("rl") / "distill"
    train.main(["--stage", "distill", "--out", str(out), "--steps", "3", "--batch-size", "4", "--budget", "30",
                "--eval-n", "0", "--max-new-tokens", "8"])
    return out


def rl_rows(out):
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timing = lambda k: k in ("step_s", "peak_gib") or k.startswith("time_")
    return [{k: v for k, v in r.items() if not timing(k)} for r in rows]  # all but the clock and the memory


def params(out):
    return M.load_model(out).state_dict()


def test_the_bfloat16_sampler_copy_takes_the_trained_weights():
    """CUDA's sampler is a bfloat16 copy of the policy (train.py choice 4), refreshed after each update."""
    import copy
    import train

    torch.manual_seed(0)
    model = M.Transformer(M.tiny_config(40, hidden_size=32, intermediate_size=64, num_hidden_layers=2))
    sampler = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # an update
    train.copy_weights(sampler, model)
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    got = sampler.state_dict()
    # exact: a cast, computed once each way
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sampler.lm_head.weight is sampler.model.embed_tokens.weight  # still tied


def test_eval_show_prints_prompts_responses_and_what_is_right(distilled, capsys):
    import train

    log = distilled / "eval.jsonl"
    before = log.read_text() if log.exists() else None
    train.main(["--stage", "eval", "--init", str(distilled), "--eval-splits", "dev", "--eval-n", "20", "--show", "2",
                "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert (out.count("=== dev problem ") == 2 and out.count("=== the response") == 2
            and out.count("=== what is right") == 2)
    assert "How many" in out and out.count("\nroute 1: ") == 2 and "(verdict " in out
    assert (log.read_text() if log.exists() else None) == before  # showing is not scoring: nothing appended


def test_interrupted_and_resumed_equals_uninterrupted(distilled, tmp_path, monkeypatch):
    import mrpv
    import train

    monkeypatch.setattr(mrpv, "reward", varied_reward)
    train.main(["--stage", "rl", "--init", str(distilled), "--out", str(tmp_path / "a")] + RL_FLAGS)

    calls = []
    real = train.generate

    def dies_in_step_4(*a, **k):  # the 4th rollout: after the checkpoint at step 2 and the logged step 3
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("power cut")
        return real(*a, **k)

    monkeypatch.setattr(train, "generate", dies_in_step_4)
    with pytest.raises(RuntimeError, match="power cut"):
        train.main(["--stage", "rl", "--init", str(distilled), "--out", str(tmp_path / "b")] + RL_FLAGS)
    assert [r["step"] for r in rl_rows(tmp_path / "b")] == [1, 2, 3]
    monkeypatch.setattr(train, "generate", real)
    train.main(["--stage", "rl", "--out", str(tmp_path / "b"), "--resume"])

    a, b = rl_rows(tmp_path / "a"), rl_rows(tmp_path / "b")
    # exact: resuming runs the uninterrupted run's ops again, from exactly saved weights, optimizer and RNG
    assert [r["step"] for r in a] == [1, 2, 3, 4] and a == b
    pa, pb = params(tmp_path / "a"), params(tmp_path / "b")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], v) for k, v in params(distilled).items())  # and RL did change the model


def test_torchrun_two_processes_equal_one(distilled, tmp_path):
    """2 gloo processes, each sampling half of each step's prompts, against 1 process sampling them all.
    The samples are the same (per-prompt seeds); the gradients are sums over different micro-batches,
    so they agree to float32 rounding, and Adam's update is bounded by the learning rate: 1e-5 apart
    at most after 2 steps is far below the 1e-4 steps RL makes."""
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text("import sys, mrpv, train, test_grpo\n"
                      "mrpv.reward = test_grpo.varied_reward\n"
                      "train.main(sys.argv[1:])\n")
    flags = ["--stage", "rl", "--init", str(distilled), "--steps", "2", "--prompts-per-step", "4",
             "--num-generations", "3", "--eval-n", "0", "--max-new-tokens", "10", "--device", "cpu"]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}:{repo / 'tests'}", "OMP_NUM_THREADS": "1"}
    for out, launch in [("one", [sys.executable]),
                        ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 "--master_port=29531"])]:
        r = subprocess.run(launch + [str(script)] + flags + ["--out", str(tmp_path / out)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    one, two = rl_rows(tmp_path / "one"), rl_rows(tmp_path / "two")
    # Not the same ops: each process samples 2 of the 4 prompts (other batch shapes and padding), so the
    # logits differ by float32 rounding (~1e-6) and a sampled token could flip where two candidates of
    # the exponential race are within that of each other. Those races' gaps are spread over O(1): a tie
    # that close has odds ~1e-6 a token, ~1e-4 over these 240 tokens, fixed by the seeds: not a real
    # risk, so the samples, and rewards, are the same. A reward is then a float64 mean of the same values
    # in another order (~1e-16 apart): 1e-9 allows that, not one other sample (it moves the mean >= 1/72).
    # The losses (near 0: the advantages are centred) are float32 means of O(1) per-token terms summed
    # over other micro-batches: ~3e-8 apart measured, ~1e-7 expected; 1e-5 is 100x that.
    assert len(one) == len(two) == 2
    for x, y in zip(one, two):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-9)  # the same samples
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    p1, p2 = params(tmp_path / "one"), params(tmp_path / "two")
    assert max((p1[k] - p2[k]).abs().max().item() for k in p1) < 1e-5
    assert any(not torch.equal(p1[k], v) for k, v in params(distilled).items())


def test_reference_model_rft_and_minibatches(distilled, tmp_path, monkeypatch):
    import mrpv
    import train

    monkeypatch.setattr(mrpv, "reward", varied_reward)
    # a rate that moves the ratio past the clip
    train.main(["--stage", "rl", "--init", str(distilled), "--out", str(tmp_path / "kl"), "--beta", "0.5",
                "--mu", "2", "--num-minibatches", "2", "--lr", "3e-3"] + RL_FLAGS)
    rows = [r for r in rl_rows(tmp_path / "kl") if "stage" in r]
    assert rows[0]["kl"] > 0  # the second minibatch and the second epoch already differ from the reference
    assert any(r["clip_frac"] > 0 for r in rows)  # off-policy epochs: the clip engages
    train.main(["--stage", "rl", "--init", str(distilled), "--out", str(tmp_path / "rft"), "--algo", "rft"] + RL_FLAGS)
    assert len([r for r in rl_rows(tmp_path / "rft") if "stage" in r]) == 4


def test_non_finite_steps_are_skipped_then_stop_the_run(distilled, tmp_path, monkeypatch):
    import grpo
    import mrpv
    import train

    monkeypatch.setattr(mrpv, "reward", varied_reward)
    real = grpo.grpo_loss
    steps = []

    def nan_after_step_2(*a, **k):
        loss, stats = real(*a, **k)
        return (loss * float("nan") if len(steps) > 2 else loss), stats

    monkeypatch.setattr(train, "generate", (lambda g: lambda *a, **k: steps.append(1) or g(*a, **k))(train.generate))
    monkeypatch.setattr(grpo, "grpo_loss", nan_after_step_2)
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "rl", "--init", str(distilled), "--out", str(tmp_path / "nan"), "--steps", "9",
                    "--save-every", "1"] + RL_FLAGS[2:10])
    assert "not finite in 3 steps in a row (to step 5)" in str(e.value.code)
    assert "holds the last good checkpoint (step 2)" in str(e.value.code)
    rows = [r for r in rl_rows(tmp_path / "nan") if "stage" in r]
    assert [r["skipped_updates"] for r in rows] == [0, 0, 1, 1, 1]
    assert [r["loss"] is None for r in rows] == [False, False, True, True, True]  # strict JSON: null, not NaN
    json.loads("[" + ",".join((tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()) + "]",
               parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
    assert all(torch.isfinite(v).all() for v in params(tmp_path / "nan").values())


def test_bench_times_each_phase(tmp_path, capsys):
    import bench

    bench.main(["tiny", "--steps", "2", "--prompts-per-step", "2", "--num-generations", "2",
                "--max-new-tokens", "6", "--out", str(tmp_path / "bench"), "--grad-checkpointing"])
    out = capsys.readouterr().out
    for phase in ("rollout", "reward", "backward", "optimizer", "peak memory"):
        assert phase in out
    assert "tok/s sampled" in out and "mean of 1 steps" in out


def test_rl_on_a_qwen_layout_checkpoint_with_gsm8k_jsonl_and_the_chat_format(tmp_path, monkeypatch):
    """A random-weight folder in the Qwen2.5 layout (qkv bias, tied head, ChatML template) through 2 RL
    steps on GSM8K-format JSONL (answers after '####', one problem with teacher routes)."""
    import json

    import train
    from conftest import write_checkpoint

    words = [str(i) for i in range(30)] + "Tom has apples . He buys more How many ? Answer : #### so".split()
    tok = build_tokenizer(words)
    tok.tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder = write_checkpoint(tmp_path / "qwen", "qwen2", vocab_size=tok.vocab_size, max_position_embeddings=512)
    tok.save(folder)
    template = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] }}{%- endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in [
        {"question": "Tom has 3 apples . He buys 4 more . How many ?", "answer": "3 + 4 = 7 apples\n#### 7",
         "routes": [{"text": "3 + 4 = 7\nAnswer : 7", "correct": True},
                    {"text": "3 + 4 = 8\nAnswer : 8", "correct": False}]},
        {"question": "Tom has 9 apples . How many ?", "answer": "#### 9"},
    ]) + "\n")

    seen = []
    real = train.generate
    monkeypatch.setattr(train, "generate", lambda m, prompts, **k: seen.extend(prompts) or real(m, prompts, **k))
    train.main(["--stage", "rl", "--init", str(folder), "--data", str(data), "--out", str(tmp_path / "rl"),
                "--steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "6"])
    rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    im_start = tok.tok.token_to_id("<|im_start|>")
    assert seen and all(p[0] == im_start for p in seen)  # the prompts are in the checkpoint's chat format
    assert M.load_model(tmp_path / "rl").config.qkv_bias


def test_route_bank_problems_constant_lr_and_autonomous_steps(distilled, tmp_path, monkeypatch):
    """RL prompts come from the start's route bank (routes.jsonl); --lr-schedule constant: the peak after the
    warm-up; each step says whether it showed any route."""
    import domain as D
    import train

    seen = []
    real = train.generate
    monkeypatch.setattr(train, "generate", lambda m, prompts, **k: seen.extend(prompts) or real(m, prompts, **k))
    train.main(["--stage", "rl", "--init", str(distilled), "--out", str(tmp_path / "rl"), "--lr-schedule", "constant",
                "--warmup", "1", "--lr", "1e-4", "--eaai-decay", "0.5"] + RL_FLAGS)
    rows = [r for r in rl_rows(tmp_path / "rl") if r.get("stage") == "rl"]
    assert [r["lr"] for r in rows] == [1e-4] * 4  # exact: lr * 1.0 in Python floats
    assert all(r["autonomous"] for r in rows if r["hint"] == 0)
    assert not any(r["autonomous"] for r in rows if r["hint"] == 1)
    # (in between, a step is autonomous when no prompt drew routes)
    assert rows[0]["hint"] == 1 and rows[-1]["hint"] == 0
    tok = load_tokenizer(distilled)
    bank = {p.question for p in D.load_jsonl(distilled / "routes.jsonl")}
    # the question, wherever it is
    asked = {next(x for x in tok.decode(p).split("\n") if x.startswith("Stock")) for p in seen}
    assert asked and asked <= bank


def test_resume_takes_the_saved_flags_and_drops_later_metrics(tmp_path):
    """--resume goes on with the flags the run was saved with, not the command line's, and drops the metrics
    lines logged after its checkpoint."""
    import domain as D
    import flags
    import train

    saved = vars(flags.parse(["--stage", "rl", "--order", "verify-solve", "--advantages", "sample"]))
    rngs = {"python": None, "routes": None, "torch": None}  # what rl_setup restores; rl_resume only reads the flags
    torch.save({"stage": "rl", "step": 2, "args": saved, "optimizer": {}, "eaai": {}, "rng": rngs},
               tmp_path / "trainer_state.pt")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 3}\n')
    _, resumed = train.rl_resume(flags.parse(["--stage", "rl", "--device", "cpu"]), tmp_path, 0)
    got = (resumed.order, resumed.advantages, resumed.resume, resumed.device)
    assert got == ("verify-solve", "sample", True, "cpu")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    torch.save({"stage": "rl", "step": 2, "args": saved, "rng": {"python": None}}, tmp_path / "trainer_state.pt")
    with pytest.raises(D.DataError, match=r"lacks optimizer, eaai, rng.routes, rng.torch \(a trainer state"):
        train.rl_resume(flags.parse(["--stage", "rl"]), tmp_path, 0)


def test_arms_with_and_without_routes_draw_the_same_problems(distilled, tmp_path, monkeypatch):
    """Problems and routes come from separate random streams: ReaLM (routes shown) and plain GRPO (none) ask the
    same questions at every step."""
    import train

    asked, shown, real = [], [], train.generate
    tok = load_tokenizer(distilled)
    question = lambda p: next(x for x in tok.decode(p).split("\n") if x.startswith("Stock"))

    def recording(m, prompts, **k):
        asked.append([question(p) for p in prompts])
        shown.append(sum("Route 1" in tok.decode(p) for p in prompts))
        return real(m, prompts, **k)

    monkeypatch.setattr(train, "generate", recording)
    for arm, flags in (("realm", []), ("grpo", ["--routes", "none", "--reward", "answer"])):
        train.main(["--stage", "rl", "--init", str(distilled), "--out", str(tmp_path / arm), *flags] + RL_FLAGS)
    assert len(asked) == 8 and asked[:4] == asked[4:]
    assert sum(shown[:4]) > 0 and sum(shown[4:]) == 0  # realm's prompts showed routes, grpo's none
