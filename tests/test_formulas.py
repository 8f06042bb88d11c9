"""Formulas pinned by values: group and per-component advantages, the PPO-clip bounds and clip fraction, the KL
coefficient, micro-batch and minibatch shares of the update, MRPV's partial routes, consistency and format, EAAI's
route count, the SFT loss's token count, verdict and reading drills, and the sampler's distribution and truncation.
Each test is on hand-computed values (or frequencies of a seeded draw), so a one-token slip in a formula fails it."""

import math
import random

import pytest
import torch

import distill
import domain as D
import eaai as E
import grpo
import model as M
import mrpv as P
from rollout import sample


# ---- grpo.py: advantages ----

def test_group_advantages_centre_each_group_on_its_own_mean():
    """Two groups whose means differ (1 and 10): each sample is compared with its own group, not the batch."""
    a = grpo.group_advantages(torch.tensor([0.0, 2.0, 10.0, 10.0]), n=2, scale=False)
    assert a.tolist() == [-1.0, 1.0, 0.0, 0.0]  # exact: small integers in float32
    # scaled: +-1 / (population std 1 + eps 1e-4); float32 against float64: rel 1e-6
    s = grpo.group_advantages(torch.tensor([0.0, 2.0, 10.0, 10.0]), n=2)
    assert s.tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0], rel=1e-6)


def test_a_component_of_weight_zero_gets_no_advantage():
    """A component weighted 0 is left out, so a line whose components all weigh 0 gets 0 (not 0 / 0)."""
    parts = {"answer": torch.tensor([0.0, 1.0]), "verdict": torch.tensor([1.0, 0.0]), "format": torch.ones(2)}
    w = {"answer": 1.0, "verdict": 0.0, "step": 0.0, "format": 0.0}  # train.py's --reward answer with --w-format 0
    adv = grpo.component_advantages(parts, w, n=2)
    assert set(adv) == {"answer"}
    assert grpo.token_advantages(adv, w, 0, [True, False]) == [0.0, pytest.approx(-0.5 / 0.5001, rel=1e-6)]


def test_a_component_that_applies_to_some_groups_only_keeps_its_advantage_there():
    """The step reward applies in group 2 only (NaN in group 1): it is normalised there, and left out of group 1's
    mix, so each group's token advantages are what they would be in a batch of its own (as under torchrun, where
    each process holds its own groups)."""
    nan = float("nan")
    parts = {"verdict": torch.tensor([0.0, 1.0, 0.0, 1.0]), "step": torch.tensor([nan, nan, 0.0, 1.0])}
    w = {"verdict": 0.5, "step": 0.5}
    adv = grpo.component_advantages(parts, w, n=2)
    # (0 - 0.5) / (0.5 + 1e-4) = -0.5 / 0.5001; float32: rel 1e-6
    assert adv["step"][2:].tolist() == pytest.approx([-0.5 / 0.5001, 0.5 / 0.5001], rel=1e-6)
    assert torch.isnan(adv["step"][:2]).all()
    together = [grpo.token_advantages(adv, w, i, [True]) for i in range(4)]
    first = grpo.component_advantages({c: r[:2] for c, r in parts.items()}, w, n=2)
    second = grpo.component_advantages({c: r[2:] for c, r in parts.items()}, w, n=2)
    alone = [grpo.token_advantages(first, w, i, [True]) for i in range(2)]
    alone += [grpo.token_advantages(second, w, i, [True]) for i in range(2)]
    assert together == alone  # exact: the same float32 values, mixed in the same order
    assert together[0] == [pytest.approx(-0.5 / 0.5001, rel=1e-6)]  # group 1: the verdict alone, not halved


def test_token_advantages_mix_verdict_step_format_on_verdict_lines_and_answer_format_elsewhere():
    """grpo.py choice 5 by hand: verdict lines get the weighted mean of verdict, step and format; every other line
    the weighted mean of answer and format."""
    adv = {"answer": torch.tensor([2.0]), "verdict": torch.tensor([1.0]), "step": torch.tensor([-3.0]),
           "format": torch.tensor([0.5])}
    w = {"answer": 1.0, "verdict": 0.5, "step": 0.25, "format": 0.1}
    on_verdict, chain = grpo.token_advantages(adv, w, 0, [True, False])
    # float64 sums of exact float32 values: rel 1e-12 allows only the rounding of the division
    assert on_verdict == pytest.approx((0.5 * 1 + 0.25 * -3 + 0.1 * 0.5) / 0.85, rel=1e-12)
    assert chain == pytest.approx((1 * 2 + 0.1 * 0.5) / 1.1, rel=1e-12)


def test_per_token_advantages_read_each_component_of_the_rewards():
    """From mrpv.Reward records: one group of 2; verdict and answer vary, format does not."""
    rewards = [P.Reward(answer=1.0, verdict=0.0, step=None, format=1.0, total=0.0),
               P.Reward(answer=0.0, verdict=1.0, step=None, format=1.0, total=0.0)]
    w = {"answer": 1.0, "verdict": 0.5, "step": 0.5, "format": 0.1}
    got = grpo.per_token_advantages(rewards, w, [[False, True], [True]], n=2)
    a = 0.5 / 0.5001  # each varying component: +-0.5 / (0.5 + eps)
    # verdict lines: (0.5 * A_verdict + 0.1 * 0) / 0.6; the chain: (1 * A_answer + 0.1 * 0) / 1.1
    assert got[0] == pytest.approx([a / 1.1, -0.5 * a / 0.6], rel=1e-6)
    assert got[1] == pytest.approx([0.5 * a / 0.6], rel=1e-6)


# ---- grpo.py: the loss ----

RATIOS = [1.2, 1.4, 0.85, 0.8, 0.95, 1.5]
ADVS = [1.0, 1.0, -1.0, 1.0, -1.0, -1.0]


def one_token_loss(ratio, adv, eps_low=0.1, eps_high=0.3):
    logp = torch.log(torch.tensor([[ratio]]))
    return grpo.grpo_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), eps_low, eps_high)


def test_clip_bounds_are_one_minus_eps_low_and_one_plus_eps_high():
    """eps_low 0.1, eps_high 0.3: the ratio is clipped to [0.9, 1.3]; l = -min(rho A, clip(rho) A) per token."""
    want = [-1.2,  # 1.2 inside the bounds: -1.2 (an upper bound at 1 + eps_low = 1.1 would give -1.1)
            -1.3,  # A > 0 above 1.3: the clip, -1.3
            0.9,  # A < 0 below 0.9: -min(-0.85, -0.9) = 0.9 (a lower bound at 1 - eps_high = 0.7 gives 0.85)
            -0.8,  # A > 0 below the lower bound: the unclipped -0.8 is the smaller
            0.95,  # inside
            1.5]  # A < 0 above the upper bound: -min(-1.5, -1.3) = 1.5
    got = [one_token_loss(r, a)[0].item() for r, a in zip(RATIOS, ADVS)]
    assert got == pytest.approx(want, rel=1e-6)  # float32 exp(log r) against the decimals: ~1e-7 relative


def test_clip_fraction_counts_the_tokens_whose_gradient_the_clip_cuts():
    """Clipped: rho > 1 + eps_high with A > 0, or rho < 1 - eps_low with A < 0; the other side of each bound keeps
    its gradient and is not counted. Over a padded batch, the fraction is of the real tokens."""
    clipped = [one_token_loss(r, a)[1]["clip_frac"] for r, a in zip(RATIOS, ADVS)]
    assert clipped == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    logp = torch.log(torch.tensor([RATIOS[:3], RATIOS[3:]]))  # (2, 3)
    adv = torch.tensor([ADVS[:3], [1.0, 1.0, 1.0]])  # row 2: A > 0, so its rho 1.5 would be clipped ...
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # ... but it is padding, as is 0.95
    _, stats = grpo.grpo_loss(logp, torch.zeros(2, 3), adv, mask, 0.1, 0.3)
    assert stats["clip_frac"] == 0.5  # 1.4 (A > 0) and 0.85 (A < 0) of 4 real tokens; exact: 2 / 4


def test_kl_enters_the_loss_times_beta():
    """Zero advantages: the loss is beta times the k3 KL, exp(d) - d - 1 at d = log pi_ref - log pi = 0.5."""
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    loss, stats = grpo.grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), beta=0.25, ref_logp=logp + 0.5)
    k3 = math.exp(0.5) - 0.5 - 1
    assert stats["kl"] == pytest.approx(k3, rel=1e-6) and loss.item() == pytest.approx(0.25 * k3, rel=1e-6)
    # the other direction of d gives exp(-0.5) + 0.5 - 1 = 0.1065, not 0.1487
    _, back = grpo.grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), beta=0.25, ref_logp=logp - 0.5)
    assert back["kl"] == pytest.approx(math.exp(-0.5) + 0.5 - 1, rel=1e-6)


# ---- grpo.py: micro-batches and minibatches ----

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return M.Transformer(M.tiny_config(40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       max_position_embeddings=64))


def two_examples(model, shifts):
    """Completions of 4 and 1 tokens, advantages +1 and -2; the old log-probs are the model's own minus shift, so
    rho = e^shift."""
    prompts, completions = [[3, 4, 5], [6, 7]], [[8, 9, 10, 11], [12]]
    with torch.no_grad():
        logp, _ = grpo.sequence_logprobs(model, prompts, completions, pad_id=0)
    return [grpo.Example(p, c, (logp[i, :len(c)] - s).tolist(), a, i)
            for i, (p, c, s, a) in enumerate(zip(prompts, completions, shifts, (1.0, -2.0)))]


@pytest.mark.parametrize("micro_tokens", [4096, 7])  # one micro-batch (padded to 2 x 7), or one example each
def test_micro_batch_losses_weigh_by_their_share_of_the_minibatch(tiny, micro_tokens):
    """Example 1 is off-policy (rho = e > 1.2, A = +1: clipped, -1.2 a token), example 2 on-policy (A = -2: +2).
    Token mean: (4 x -1.2 + 2) / 5 = -0.56, clip fraction 4 / 5; sequence mean: (-1.2 + 2) / 2 = 0.4.
    The same whatever the cut: each micro-batch's mean weighted by its share of real tokens (or sequences)."""
    part = two_examples(tiny, (1.0, 0.0))
    cfg = grpo.Config(micro_tokens=micro_tokens)
    tiny.zero_grad()
    loss, clip, kl = grpo.minibatch_loss(tiny, None, part, 5, cfg, pad_id=0)
    # rho = exp of a log-prob difference recomputed in another batch (float32, ~1e-6 off exactly 1 or e):
    # the clip and the A = -2 branch are exact up to that; rel 1e-5
    assert (loss, clip, kl) == (pytest.approx(-0.56, rel=1e-5), pytest.approx(0.8, rel=1e-6), 0.0)
    seq = grpo.Config(micro_tokens=micro_tokens, loss_type="sequence")
    loss, clip, _ = grpo.minibatch_loss(tiny, None, part, 2, seq, pad_id=0, n_tokens=5)
    # the clip fraction is a share of tokens whatever the loss's mean: 4 / 5, in one micro-batch or two
    assert (loss, clip) == (pytest.approx(0.4, rel=1e-5), pytest.approx(0.8, rel=1e-6))
    tiny.zero_grad()


def recorded_update(monkeypatch, model, cfg, batch):
    """policy_update's minibatches: (groups, n) per optimizer step, minibatch_loss replaced by a recorder."""
    seen = []
    monkeypatch.setattr(grpo, "minibatch_loss",
                        lambda model, ref, part, n, cfg, pad_id, n_tokens: seen.append(([e.group for e in part], n))
                        or (0.0, 0.0, 0.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grpo.policy_update(model, None, opt, batch, cfg, 1, 0)
    return seen


def test_minibatch_m_takes_the_groups_congruent_to_m_and_its_mean_is_over_their_tokens(tiny, monkeypatch):
    """Groups 0..4, group g's completion g + 1 tokens long: minibatch 0 holds groups 0, 2, 4 (1 + 3 + 5 = 9 tokens),
    minibatch 1 groups 1, 3 (2 + 4 = 6), each epoch the same; by sequences, 3 and 2 (grpo.py choice 1)."""
    batch = [grpo.Example([1, 2], [5] * (g + 1), [0.0] * (g + 1), 1.0, g) for g in range(5)]
    token = recorded_update(monkeypatch, tiny, grpo.Config(num_minibatches=2, mu=2), batch)
    assert token == [([0, 2, 4], 9), ([1, 3], 6)] * 2
    sequence = recorded_update(monkeypatch, tiny, grpo.Config(num_minibatches=2, loss_type="sequence"), batch)
    assert sequence == [([0, 2, 4], 3), ([1, 3], 2)]


# ---- mrpv.py ----

ROUTE = D.Route("s1\ns2\ns3\ns4\nAnswer : 5", False, 2)  # four step lines, the second one wrong


def test_show_takes_the_first_ceil_of_frac_times_steps_lines():
    assert P.show(D.Route("s1\ns2\ns3\nAnswer : 3", True), 0.5) == D.Route("s1\ns2", True)  # ceil(1.5) = 2
    assert P.show(D.Route("s1\ns2\ns3\nAnswer : 3", True), 0.34) == D.Route("s1\ns2", True)  # ceil(1.02) = 2
    assert P.show(ROUTE, 0.2) == D.Route("s1", True)  # ceil(0.8) = 1: cut before its error, so sound


def test_a_route_cut_at_its_first_wrong_step_is_wrong_and_one_cut_at_its_last_line_is_whole():
    assert P.show(ROUTE, 0.5) == D.Route("s1\ns2", False, 2)  # the wrong step is the last one shown
    assert P.show(ROUTE, 0.75) == D.Route("s1\ns2\ns3", False, 2)
    assert P.show(ROUTE, 0.9) == ROUTE  # ceil(3.6) = 4: every step line, so the route whole with its answer


def test_consistency_also_takes_the_step_credit_of_a_verdict_that_contradicts_the_own_answer():
    """Own answer 5 copies the wrong route: "wrong at step 2" names its step, but calls wrong the route that reaches
    the own answer, so under Weights(consistent=True) neither verdict nor step earns."""
    p = D.Problem("How many ?", "7")
    routes = [ROUTE, D.Route("s1\nt2\nt3\nt4\nAnswer : 7", True)]
    completion = "x\nAnswer : 5\nRoute 1 : wrong at step 2\nRoute 2 : sound"
    plain, consistent = P.reward(completion, p, routes), P.reward(completion, p, routes, P.Weights(consistent=True))
    assert (plain.verdict, plain.step) == (1.0, 1.0)
    assert (consistent.answer, consistent.verdict, consistent.step, consistent.format) == (0.0, 0.0, 0.0, 1.0)
    assert consistent.total == pytest.approx(0.1 / 2.1, rel=1e-12)  # format alone: 0.1 of weights 1 + 0.5 + 0.5 + 0.1


def test_format_needs_a_step_line_and_a_non_empty_answer_line():
    p, routes = D.Problem("How many ?", "5"), [ROUTE]
    assert P.reward("x\nAnswer : 5\nRoute 1 : wrong at step 2", p, routes).format == 1.0
    assert P.reward("Answer : 5\nRoute 1 : wrong at step 2", p, routes).format == 0.0  # no own step
    assert P.reward("Route 1 : wrong at step 2\nAnswer : 5", p, routes, order="verify-solve").format == 0.0
    assert P.reward("x\nAnswer :\nRoute 1 : wrong at step 2", p, routes).format == 0.0  # an empty answer line
    assert P.reward("x\nAnswer :", p, []).format == 0.0


def test_total_is_zero_when_every_weight_is_zero():
    p = D.Problem("How many ?", "5")
    r = P.reward("x\nAnswer : 5\nRoute 1 : wrong at step 2", p, [ROUTE], P.Weights(0.0, 0.0, 0.0, 0.0))
    assert (r.answer, r.verdict, r.format, r.total) == (1.0, 1.0, 1.0, 0.0)


# ---- eaai.py ----

def test_a_shown_hint_carries_at_least_one_route():
    """h = 0.2, K = 3: h * K = 0.6, so floor(0.6 + u) is 0 or 1; every shown prompt still gets one route."""
    ann = E.Annealer(E.Schedule("linear", decay=100), K=3, seed=0)
    hints = [ann.hint(80) for _ in range(500)]
    shown = [h for h in hints if h.show]
    assert 60 < len(shown) < 140  # about h = 0.2 of 500
    assert all(h.k == 1 and h.frac == pytest.approx(0.2, rel=1e-12) for h in shown)


def test_route_count_is_stochastic_rounding_of_h_times_k():
    """h = 0.5, K = 3: floor(1.5 + u), 1 or 2 with equal odds, mean 1.5 (the counts of 2000 shown hints)."""
    ann = E.Annealer(E.Schedule("linear", decay=100), K=3, seed=0, vary_show=False)
    ks = [ann.hint(50).k for _ in range(2000)]
    assert set(ks) == {1, 2} and abs(sum(ks) / 2000 - 1.5) < 0.04  # sd of the mean 0.011


# ---- distill.py ----

class Uniform(torch.nn.Module):
    """A stand-in model whose logits are all 0: every target's cross-entropy is exactly log V."""
    def __init__(self, V=50):
        super().__init__()
        self.lm_head = torch.nn.Linear(1, V, bias=False)
        self.zero = torch.nn.Parameter(torch.zeros(V))

    def forward(self, x, keep=None):
        return self.zero.expand(int(keep.sum()), -1)


@pytest.mark.parametrize("micro_tokens", [4096, 6])  # one micro-batch, or one example each
def test_sft_loss_is_the_mean_over_the_response_tokens_that_carry_loss(micro_tokens):
    """Each target costs log V; 3 + 4 response tokens, one skipped (a drill's third element): (6 log V) / 6."""
    import contextlib
    batch = [([1, 2], [3, 4, 5]), ([1], [6, 7, 8, 9], {1})]
    loss = distill.sft_step(Uniform(), batch, 0, micro_tokens, contextlib.nullcontext())
    assert loss == pytest.approx(math.log(50), rel=1e-6)


def test_verdict_drills_draw_results_from_zero_to_top():
    """A route's result is the own answer or any other number of 0..top, top included."""
    tok = D.tokenizer()
    pairs = set()
    for p, _, _ in distill.verdict_drills(400, 3, random.Random(0), tok, top=3):
        lines = tok.decode(p).split("\n")
        own = int(lines[-2].split(" : ")[1])
        pairs |= {(own, int(x.split(" : ")[1])) for x in lines[:-2]}
    assert pairs == {(a, b) for a in range(4) for b in range(4)}  # every pair, the top 3 among the wrong ones
    for p, _, _ in distill.verdict_drills(20, 2, random.Random(0), tok, top=1):  # 0 or 1: a wrong one is the other
        lines = tok.decode(p).split("\n")
        assert {x.split(" : ")[1] for x in lines[:-1]} <= {"0", "1"}


def test_reading_set_gives_the_n_drills_asked_for():
    problems, banks = distill.reading_set(40, 2, seed=0)
    assert len(problems) == len(banks) == 40 and all(D.route_only(p) for p in problems)


# ---- rollout.py ----

def frequencies(tokens, V):
    return (torch.bincount(tokens, minlength=V) / len(tokens)).tolist()


def test_sampling_draws_each_token_at_its_probability_under_the_temperature():
    """20000 rows of one distribution: the frequencies within 0.015 (about 4 standard deviations) of
    softmax(logits / T), and the log-probs returned are log_softmax(logits / T) at the tokens drawn."""
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(20000, 1)
    tokens, lp = sample(logits, 1.0, 0, 1.0, [torch.Generator().manual_seed(0)])
    assert frequencies(tokens, 3) == pytest.approx([0.6, 0.3, 0.1], abs=0.015)
    assert lp.tolist() == pytest.approx(probs.log()[tokens].tolist(), rel=1e-6)
    hot = (probs ** 0.5 / (probs ** 0.5).sum()).tolist()  # T = 2: p^(1/2), renormalised: 0.473, 0.334, 0.193
    tokens, lp = sample(logits, 2.0, 0, 1.0, [torch.Generator().manual_seed(1)])
    assert frequencies(tokens, 3) == pytest.approx(hot, abs=0.015)
    assert lp.tolist() == pytest.approx([math.log(hot[t]) for t in tokens.tolist()], rel=1e-5)


def test_top_p_keeps_the_token_that_crosses_top_p_and_top_k_keeps_k():
    """Probabilities 0.4, 0.3, 0.2, 0.1. top_p 0.5: the smallest prefix holding half the mass is {0, 1} (0.4 alone
    is short of it), drawn at 4/7 and 3/7. top_k 3: {0, 1, 2} at 4/9, 3/9, 2/9. The log-probs stay untruncated."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().repeat(20000, 1)
    tokens, lp = sample(logits, 1.0, 0, 0.5, [torch.Generator().manual_seed(0)])
    assert frequencies(tokens, 4) == pytest.approx([4 / 7, 3 / 7, 0.0, 0.0], abs=0.015)
    assert lp.tolist() == pytest.approx(probs.log()[tokens].tolist(), rel=1e-6)
    tokens, _ = sample(logits, 1.0, 3, 1.0, [torch.Generator().manual_seed(0)])
    assert frequencies(tokens, 4) == pytest.approx([4 / 9, 3 / 9, 2 / 9, 0.0], abs=0.015)
