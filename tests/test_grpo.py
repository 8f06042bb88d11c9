import pytest
import torch

import model as M
from rollout import generate
from train import group_advantages, grpo_loss, sequence_logprobs


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, n=4)
    assert torch.allclose(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(a[4:], torch.zeros(4))  # an all-equal group carries no signal
    assert torch.allclose(group_advantages(r, n=4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


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
    assert ((logp - old).abs() * mask).max() <= 1e-5  # the sampler's log-probs are the training forward's
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, 0.0])

    policy.zero_grad()
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    ours = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    logp2, _ = sequence_logprobs(policy, prompts, completions, pad_id=0, temperature=temperature)
    (-(adv[:, None] * logp2 * mask).sum() / mask.sum()).backward()  # REINFORCE, same token mean
    for a, b in zip(ours, (p.grad for p in policy.parameters())):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert stats["clip_frac"] == 0.0 and stats["kl"] == 0.0


def test_clip_engages_where_it_should():
    mask = torch.ones(4, 1)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_()  # ratios 1.5, 1.5, 0.5, 0.5
    loss, stats = grpo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    loss.backward()
    g = logp.grad[:, 0]
    # ratio above 1 + eps with A > 0, or below 1 - eps with A < 0: clipped, no gradient
    assert g[0] == 0 and g[3] == 0 and g[1] != 0 and g[2] != 0
    assert stats["clip_frac"] == 0.5
    assert loss.item() == pytest.approx(-(1.2 * 1 + 1.5 * -1 + 0.5 * 1 + 0.8 * -1) / 4)


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
    assert s["kl"] == 0.0  # policy == reference
    loss, s = grpo_loss(logp, logp, zero, mask, beta=1.0, ref_logp=logp + 0.5)
    k3 = torch.exp(torch.tensor(0.5)) - 0.5 - 1
    assert s["kl"] == pytest.approx(float(k3)) and loss.item() == pytest.approx(float(k3))
    adv = torch.tensor([1.0, 2.0])
    token, _ = grpo_loss(logp, logp, adv, mask, loss_type="token")
    seq, _ = grpo_loss(logp, logp, adv, mask, loss_type="sequence")
    assert token.item() == pytest.approx(-(1 * 2 + 2 * 3) / 5) and seq.item() == pytest.approx(-(1 + 2) / 2)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, logp, adv, mask, loss_type="group")


def test_rl_steps_run_and_log_every_contract_key(tmp_path):
    import json

    import train

    out = tmp_path / "distill"
    train.main(["--stage", "distill", "--out", str(out), "--steps", "5", "--batch-size", "4", "--budget", "30",
                "--eval-n", "21", "--max-new-tokens", "8"])
    train.main(["--stage", "rl", "--init", str(out), "--out", str(tmp_path / "rl"), "--steps", "3",
                "--prompts-per-step", "2", "--num-generations", "3", "--eval-n", "21", "--max-new-tokens", "12"])
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

    tok = M.build_tokenizer(["A"])
    M.save_model(M.Transformer(M.tiny_config(tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1)),
                 tmp_path / "ckpt", tok)
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "rl", "--init", str(tmp_path / "ckpt"), "--out", str(tmp_path / "rl")])
    assert "no route bank (python train.py --stage distill writes one" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "rl", "--init", str(tmp_path / "ckpt"), "--beta", "0.1"])
    assert "--beta > 0 needs a reference model" in str(e.value.code)
