import pytest
import torch

import model as M
from conftest import same_or_near_tie
from rollout import Sample, generate, generate_naive, greedy
from tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = M.tiny_config(64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=128)
    m = M.Transformer(cfg).eval()
    with torch.no_grad():  # a peakier distribution than the near-uniform init, so that greedy has clear winners
        m.lm_head.weight.mul_(3)  # tied: scales the embeddings too; top token ~0.3
    return m


def prompts_of(lengths, seed=0, V=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


def full_logprobs(m, prompt, tokens, temperature=1.0):
    """log_softmax(logits / T) of one full forward over prompt + completion, at the completion's tokens."""
    seq = torch.tensor([prompt + tokens])
    with torch.no_grad():
        lp = torch.log_softmax(m(seq)[0, len(prompt) - 1:-1] / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


# Tolerances. The sampler's logits come from another computation than a plain full forward (left-padded
# batches, the KV cache, last_only, torch.compile): float32 sums in another order. On this fixture's
# logits (|x| < 5) the log-probs differ by ~1e-6 (a few float32 ulps of 4; 1e-6 at most measured, at 1
# and 2 threads); LOGPROB_TOL = 1e-5 is 10x that and far below what a real bug moves (0.01 and up).
LOGPROB_TOL = 1e-5
# Two such computations may pick different tokens only where, under a reference forward, both tokens
# are within twice that of the best (each computation is within LOGPROB_TOL of the reference). Ties are
# far on this fixture (greedy: the best two logits 1.4 or more apart; the races of the sampled tests:
# 2.7e-3 or more, measured), so `agree` only guards other CPUs, thread counts and fixtures.
NEAR_TIE = 2 * LOGPROB_TOL


def race_noise(seed, rows, step, V=64):
    """The Exp(1) noise (rows, V) that generate() draws at `step` from a generator seeded with `seed`:
    one (rows, V) draw per step (rollout.py, choice 1)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(step + 1):
        q = torch.empty(rows, V).exponential_(1.0, generator=g)
    return q


def agree(m, prompt, got, want, temperature=0.0, noise=None):
    """conftest.same_or_near_tie at this file's NEAR_TIE: the tokens two different computations chose agree."""
    return same_or_near_tie(m, prompt, got, want, NEAR_TIE, temperature, noise)


def max_diff(xs, ys):
    return max((abs(x - y) for x, y in zip(xs, ys)), default=0.0)


def test_greedy_batch_equals_each_prompt_alone(lm):
    prompts = prompts_of([3, 17, 9, 1])
    batch = generate(lm, prompts, max_new_tokens=12, temperature=0)
    for i, p in enumerate(prompts):
        alone = generate(lm, [p], max_new_tokens=12, temperature=0)[0]
        assert batch[i].prompt_index == i
        same = agree(lm, p, batch[i].tokens, alone.tokens)  # batch of 4, left-padded, against batch of 1
        assert max_diff(batch[i].logprobs[:same], alone.logprobs[:same]) <= LOGPROB_TOL


def test_greedy_in_length_sorted_batches_keeps_the_prompts_order(lm):
    prompts = prompts_of([9, 2, 30, 5, 17, 2, 11])
    alone = [generate(lm, [p], max_new_tokens=7, temperature=0, eos_ids=[5])[0].tokens for p in prompts]
    for batch_size, training in ((3, False), (2, True)):  # sorted batches of 3 (or 2) against batches of 1
        lm.train(training)
        batched = greedy(lm, prompts, 7, eos_ids=[5], batch_size=batch_size)
        assert len(batched) == len(alone) and lm.training == training  # eval inside, mode restored
        for p, b, a in zip(prompts, batched, alone):
            agree(lm, p, b, a)
    lm.eval()


def test_cached_equals_recompute(lm):
    prompts = prompts_of([5, 11, 2])
    cached = generate(lm, prompts, max_new_tokens=16, temperature=0)
    naive = generate_naive(lm, prompts, 16).tolist()
    for s, ref, p in zip(cached, naive, prompts):
        agree(lm, p, s.tokens, ref)  # the KV cache against a full forward per step
        want = full_logprobs(lm, p, s.tokens)
        assert (torch.tensor(s.logprobs) - want).abs().max() <= LOGPROB_TOL


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9)])
def test_logprobs_equal_the_training_forward(lm, temperature, top_k, top_p):
    prompts = prompts_of([4, 9])
    for s in generate(lm, prompts, n=3, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=3):
        want = full_logprobs(lm, prompts[s.prompt_index], s.tokens, temperature)
        assert (torch.tensor(s.logprobs) - want).abs().max() <= LOGPROB_TOL  # cached sampler against a full forward


def test_seeds(lm):
    prompts = prompts_of([6, 3])
    a = generate(lm, prompts, n=4, max_new_tokens=20, seed=1)
    b = generate(lm, prompts, n=4, max_new_tokens=20, seed=1)
    c = generate(lm, prompts, n=4, max_new_tokens=20, seed=2)
    assert [s.tokens for s in a] == [s.tokens for s in b]  # exact: one computation run twice
    assert [s.tokens for s in a] != [s.tokens for s in c]
    assert len({tuple(s.tokens) for s in a[:4]}) > 1  # the n samples of one prompt differ


def test_per_prompt_seeds_make_a_prompts_samples_independent_of_its_batch(lm):
    prompts = prompts_of([6, 3, 11, 4])
    together = generate(lm, prompts, n=3, max_new_tokens=20, seed=[10, 11, 12, 13])
    halves = (generate(lm, prompts[:2], n=3, max_new_tokens=20, seed=[10, 11])
              + generate(lm, prompts[2:], n=3, max_new_tokens=20, seed=[12, 13]))
    alone = generate(lm, prompts[2:3], n=3, max_new_tokens=20, seed=12)
    # batches of 4, 2 and 1 prompts, padded to other lengths: the same draws, logits equal up to rounding.
    # Prompt i's generator (seed 10 + i) draws (n, V) noise a step; its sample j reads row j.
    noise = lambda i, j: lambda step: race_noise(10 + i, 3, step)[j]
    assert len(together) == len(halves) == 12 and len(alone) == 3
    for k, (s, t) in enumerate(zip(together, halves)):
        agree(lm, prompts[k // 3], s.tokens, t.tokens, 1.0, noise(k // 3, k % 3))
    for j, (s, t) in enumerate(zip(together[6:9], alone)):
        agree(lm, prompts[2], s.tokens, t.tokens, 1.0, noise(2, j))
    assert len({tuple(s.tokens) for s in together}) > 4
    with pytest.raises(ValueError, match="one per prompt"):
        generate(lm, prompts, seed=[1, 2])


def test_compiled_decode_samples_what_the_eager_one_does(lm):
    prompts = prompts_of([5, 11, 2])
    for temperature in (0.0, 1.0):
        eager = generate(lm, prompts, n=2, max_new_tokens=12, temperature=temperature, seed=4)
        compiled = generate(lm, prompts, n=2, max_new_tokens=12, temperature=temperature, seed=4, compile=True)
        assert len(eager) == len(compiled) == 6
        for k, (s, c) in enumerate(zip(eager, compiled)):  # a static cache through torch.compile: other kernels
            i, j = divmod(k, 2)  # prompt i, sample j: row j * 3 + i of the one (6, V) noise draw a step
            same = agree(lm, prompts[i], s.tokens, c.tokens, temperature,
                         lambda step: race_noise(4, 6, step)[j * 3 + i])
            assert max_diff(s.logprobs[:same], c.logprobs[:same]) <= LOGPROB_TOL


def test_n_samples_share_a_prefill_like_separate_prefills(lm):
    prompts = prompts_of([7, 2, 12])
    shared = generate(lm, prompts, n=3, max_new_tokens=15, seed=5)
    separate = generate(lm, prompts * 3, n=1, max_new_tokens=15, seed=5)  # row j * B + i = sample j of prompt i
    assert [s.prompt_index for s in shared] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for k, s in enumerate(shared):
        i, j = divmod(k, 3)
        t = separate[j * 3 + i]  # row j * 3 + i in both runs, so the same (9, V) noise row
        # one prefill of 3 rows copied 3 times against a prefill of 9 rows: logits equal up to rounding
        same = agree(lm, prompts[i], s.tokens, t.tokens, 1.0, lambda step: race_noise(5, 9, step)[j * 3 + i])
        assert same < len(s.tokens) or s.stopped == t.stopped
        assert max_diff(s.logprobs[:same], t.logprobs[:same]) <= LOGPROB_TOL


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_stop_independently_and_finished_rows_leave_the_batch(lm, temperature):
    prompts = prompts_of([5, 8, 3, 10, 6, 4, 9, 7])
    free = generate(lm, prompts, max_new_tokens=12, temperature=temperature, seed=3)
    eos = sorted({free[i].tokens[3] for i in (0, 1, 2)})  # end tokens that end rows 0, 1, 2 by step 3, others maybe
    stopped = generate(lm, prompts, max_new_tokens=12, temperature=temperature, eos_ids=eos, seed=3)
    # Once a quarter of the rows has stopped, they leave the batch (rollout.py choice 3): from then on the
    # others run in a smaller batch, logits equal up to rounding, each row's noise the same (row i of the
    # (8, V) draw of a step). So each row: its free tokens up to its first end token, or a near-tie.
    ended = 0
    for i, (f, s) in enumerate(zip(free, stopped)):
        cut = next((k + 1 for k, t in enumerate(f.tokens) if t in eos), len(f.tokens))  # up to its first end token
        want = f.tokens[:cut]
        same = agree(lm, prompts[i], s.tokens, want, temperature, lambda step: race_noise(3, 8, step)[i])
        assert max_diff(s.logprobs[:same], f.logprobs[:same]) <= LOGPROB_TOL
        if same == len(want):
            assert s.stopped == (want[-1] in eos) and len(s.logprobs) == len(s.tokens)
        ended += s.stopped and len(s.tokens) < 12
    assert ended >= 2, "the test needs a quarter of the rows to end early, so that they leave the batch"


def test_top_k_one_is_greedy(lm):
    prompts = prompts_of([4, 13])
    greedy = generate(lm, prompts, max_new_tokens=10, temperature=0)
    topk1 = generate(lm, prompts, max_new_tokens=10, temperature=0.8, top_k=1, seed=9)
    # exact: both runs make the same forward calls on the same batch, so the same logits bit for bit, and
    # x / T and log_softmax keep the order: top-1 is the argmax unless the best two logits are within a
    # float32 ulp (this fixture's greedy steps have their best two 1.4 or more apart)
    assert [s.tokens for s in greedy] == [s.tokens for s in topk1]


def test_top_k_and_top_p_keep_to_their_sets(lm):
    prompt = prompts_of([6])
    with torch.no_grad():
        logits = lm(torch.tensor(prompt))[0, -1]
    # The sets come from this plain forward, the sampler's from its cached prefill: logits equal up to
    # rounding (~2e-7 here). The sets are the same where no boundary is a near-tie: the 3rd and 4th
    # logits, the nucleus's last token in and first out, and each token's mass before it against top_p
    # sit 8e-4 or more apart on this fixture; these checks say so if a change of fixture breaks that.
    top4 = torch.topk(logits, 4).values
    assert top4[2] - top4[3] > NEAR_TIE
    top3 = set(torch.topk(logits, 3).indices.tolist())
    firsts = {generate(lm, prompt, max_new_tokens=1, top_k=3, seed=s)[0].tokens[0] for s in range(40)}
    assert firsts <= top3 and len(firsts) > 1
    probs = logits.softmax(-1)
    p_sorted, idx = probs.sort(descending=True)
    n = int((p_sorted.cumsum(0) < 0.5).sum()) + 1
    assert p_sorted[n - 1] - p_sorted[n] > NEAR_TIE and ((p_sorted.cumsum(0) - p_sorted) - 0.5).abs().min() > NEAR_TIE
    nucleus = set(idx[:n].tolist())
    firsts = {generate(lm, prompt, max_new_tokens=1, top_p=0.5, seed=s)[0].tokens[0] for s in range(40)}
    assert firsts <= nucleus


def test_edge_cases_and_errors(lm):
    assert generate(lm, [], max_new_tokens=5) == []
    s = generate(lm, [[5]], max_new_tokens=3, temperature=0)[0]
    assert isinstance(s, Sample) and len(s.tokens) == 3 and not s.stopped
    with pytest.raises(ValueError, match=r"prompt 1 has 120 tokens; with max_new_tokens 10 that is 130 "
                                         r"> the model's context of 128"):
        generate(lm, [[5] * 3, [5] * 120], max_new_tokens=10)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(lm, [[]], max_new_tokens=10)
    with pytest.raises(ValueError, match="outside"):
        generate(lm, [[1, 64]], max_new_tokens=10)


def test_cli_samples_from_a_saved_checkpoint_and_refuses_bad_input(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tok = build_tokenizer(["A", "B", "=", "3"])
    torch.manual_seed(0)
    M.save_model(M.Transformer(M.tiny_config(tok.vocab_size, num_hidden_layers=1, hidden_size=32,
                                             intermediate_size=64, max_position_embeddings=64)), tmp_path / "m", tok)
    script = str(Path(__file__).resolve().parents[1] / "rollout.py")
    run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True, timeout=120)
    ok = run("--model", str(tmp_path / "m"), "--prompt", "A = 3", "--prompt", "B", "--n", "2", "--max-new-tokens", "5")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("--- prompt") == 4
    assert "prompt 1, sample 1 (5 tokens, stopped on max-new-tokens)" in ok.stdout
    bad = run("--model", str(tmp_path / "nowhere"), "--prompt", "x")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no config.json (expected a Hugging Face model folder)"]
    long = run("--model", str(tmp_path / "m"), "--prompt", " ".join(["A"] * 60), "--max-new-tokens", "10")
    assert long.returncode != 0 and "prompt 0 has 60 tokens" in long.stderr and "Traceback" not in long.stderr
