import json
import random
import re

import pytest
import torch

import distill
import domain as D
import evaluate
import flags
import grpo
import model as M
import mrpv
import train
from tokenizer import load_tokenizer


def test_sft_targets_cover_the_response_only():
    examples = [([5, 6, 7], [8, 9, 1]), ([5], [4, 1])]
    x, y = distill.sft_batch(examples, pad_id=0, device="cpu")
    assert x.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert y.tolist() == [[-100, -100, 8, 9, 1], [4, 1, -100, -100, -100]]

    class Logits(torch.nn.Module):  # a stand-in model whose logits are a leaf we can differentiate
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.randn(2, 5, 10))

        def forward(self, x, keep=None):
            return self.logits if keep is None else self.logits[keep]

    m = Logits()
    loss = distill.sft_loss(m, x, y)
    loss.backward()
    prompt_or_pad = y == -100
    assert (m.logits.grad[prompt_or_pad] == 0).all() and (m.logits.grad[~prompt_or_pad] != 0).any()
    want = torch.nn.functional.cross_entropy(m.logits[~prompt_or_pad], y[~prompt_or_pad])  # mean over 5 tokens
    # float32 sum / 5 against the mean of the same 5 terms: <= 2e-7 relative apart (measured); rtol 1e-5 is 50x that
    assert torch.allclose(loss, want, rtol=1e-5, atol=0)


def test_changing_the_prompt_changes_no_loss_term():
    """Prompt tokens are context, never targets: whatever they are, only response positions carry loss."""
    tok = D.tokenizer()
    p = D.split("train", 1)[0]
    response = tok.encode(D.teacher_route(p).text) + tok.eos_ids
    for prompt in (tok.encode(p.question + "\n"), tok.encode("Stock : A = 1 .\n"), [7] * 30):
        _, y = distill.sft_batch([(prompt, response)], tok.pad_id, "cpu")
        assert y[0][y[0] != -100].tolist() == response


def test_route_bank_round_trips_through_jsonl(tmp_path):
    problems, banks = distill.embedded_set("train", 30, R=3)
    assert all(sum(r.correct for r in b) == 3 and sum(not r.correct for r in b) == 3 for b in banks)
    assert all(len({r.text for r in b if r.correct}) == 1 for b in banks)  # the positives are copies (choice 1)
    D.save_jsonl([D.Problem(p.question, p.answer, p.rules, b) for p, b in zip(problems, banks)],
                 tmp_path / "bank.jsonl")
    back = D.load_jsonl(tmp_path / "bank.jsonl")
    assert [b.routes for b in back] == banks and [b.answer for b in back] == [p.answer for p in problems]
    unguided = distill.embedded_set("train", 30, R=3, guided=False)[1]
    assert distill.teacher_accuracy(banks) == 1.0 and distill.teacher_accuracy(unguided) < 0.5


def test_micro_batches_sort_and_respect_the_token_budget():
    batch = [([1] * n, [2] * 3) for n in (50, 2, 30, 7, 90, 1)]
    micro = list(grpo.micro_batches(batch, 100))
    assert [[len(p) for p, _ in m] for m in micro] == [[1, 2, 7], [30], [50], [90]]
    assert sum(len(m) for m in micro) == len(batch)


def test_micro_batches_pad_least_among_all_cuts():
    """The dynamic programme against every way to cut the sorted examples into runs (2^(n-1) of them)."""
    import itertools
    rng = random.Random(0)
    for _ in range(30):
        batch = [([1] * rng.randint(1, 60), [2] * rng.randint(1, 20)) for _ in range(rng.randint(1, 9))]
        budget, overhead = rng.choice([40, 100, 300]), rng.choice([0, 16, 64])
        n = sorted(len(p) + len(c) for p, c in batch)
        cost = lambda runs: sum(len(r) * r[-1] + overhead for r in runs)
        fits = lambda runs: all(len(r) == 1 or len(r) * r[-1] <= budget for r in runs)
        every = [[n[i:j] for i, j in zip((0, *cuts), (*cuts, len(n)))] for k in range(len(n))
                 for cuts in itertools.combinations(range(1, len(n)), k)]
        micro = list(grpo.micro_batches(batch, budget, overhead))
        runs = [[len(p) + len(c) for p, c in m] for m in micro]
        assert sorted(x for r in runs for x in r) == n and [x for r in runs for x in r] == n  # all, in order
        assert fits(runs) and cost(runs) == min(cost(r) for r in every if fits(r))


def test_sft_step_is_the_same_whatever_the_micro_batches():
    """One micro-batch or many (gradient accumulation, logits only at response positions): the same loss and
    gradients up to float32 rounding (sums in another order: ~1e-7 relative measured; rtol 1e-5)."""
    import contextlib
    tok = D.tokenizer()
    problems, banks = distill.embedded_set("train", 12, 3)
    examples = distill.sft_examples(problems, banks, tok, 0.5, 3, 0.5, random.Random(0))
    examples += distill.verdict_drills(6, 3, random.Random(1), tok)  # with skipped positions
    torch.manual_seed(0)
    model = M.Transformer(M.tiny_config(tok.vocab_size))
    grads = []
    for micro_tokens in (10**6, 64):
        model.zero_grad()
        loss = distill.sft_step(model, examples, tok.pad_id, micro_tokens, contextlib.nullcontext())
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    (loss1, g1), (loss2, g2) = grads
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_draw_batch_takes_mrpv_examples_at_their_share_only():
    alone, routed = [("a", i) for i in range(50)], [("r", i) for i in range(50)]
    first = distill.draw_batch(alone, routed, 0.0, 400, random.Random(0))
    assert {k for k, _ in first} == {"a"}  # share 0 (the first steps): no MRPV example
    rng = random.Random(0)  # and no draw for the format: the same examples as indexing alone
    assert first == [alone[rng.randrange(50)] for _ in range(400)]
    assert {k for k, _ in distill.draw_batch(alone, routed, 1.0, 400, random.Random(0))} == {"r"}
    mixed = distill.draw_batch(alone, routed, 0.25, 4000, random.Random(1))
    assert 0.22 < sum(k == "r" for k, _ in mixed) / 4000 < 0.28


def test_sft_examples_mix_both_formats():
    tok = D.tokenizer()
    problems, banks = distill.embedded_set("train", 200, 3)
    ex = distill.sft_examples(problems, banks, tok, 0.5, 3, 0.5, random.Random(0))
    route_prompts = [e for e in ex if "Route 1 :" in tok.decode(e[0])]
    assert len(ex) == 200 and 60 < len(route_prompts) < 140
    assert all(tok.decode(r).split("\n")[-1].startswith("Route ") and tok.decode(p).startswith("Route 1 :")
               for p, r in route_prompts)  # the default layout: routes, then the question; own steps, then verdicts
    vs = distill.sft_examples(problems, banks, tok, 0.5, 3, 0.5, random.Random(0), order="verify-solve")
    assert all(tok.decode(r).startswith("Route 1 : ") for p, r in vs if "Route 1 :" in tok.decode(p))

    ex = distill.sft_examples(problems, banks, tok, 1.0, 3, 0.5, random.Random(0))
    shown, said = [tok.decode(p) for p, _ in ex], [tok.decode(r) for _, r in ex]
    assert all(t.count("Answer :") == 3 and t.count("Route ") == 3 for t in shown)  # K whole routes
    assert all(re.fullmatch("S+AVVV", mrpv.parse(r).layout) for r in said)  # own steps and answer, then 3 verdicts


TINY = ["--steps", "40", "--batch-size", "8", "--budget", "100", "--eval-n", "21", "--max-new-tokens", "40",
        "--warmup", "5"]


def test_distill_runs_learns_and_writes_the_contract_layout(tmp_path, capsys):
    out = tmp_path / "distill"
    train.main(["--stage", "distill", "--out", str(out), "--eval-every", "20", "--micro-tokens", "600", *TINY])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "metrics.jsonl",
                 "routes.jsonl"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5  # the loss falls
    assert all({"step", "loss", "reward", "hint"} <= r.keys() for r in rows if "loss" in r)
    evals = [r for r in rows if "split" in r]
    assert [(r["step"], r["split"]) for r in evals] == [(20, "dev"), (40, "dev")]  # test: the eval stage
    assert all(0 <= r["acc_autonomous"] <= 1 and 0 <= r["acc_with_routes"] <= 1 for r in evals)
    m, tok = M.load_model(out, "cpu"), load_tokenizer(out)
    assert m.config.vocab_size == tok.vocab_size and m.config.eos_token_id == tok.eos_ids[0]
    assert tok.encode("Stock : A = 3") == D.tokenizer().encode("Stock : A = 3") and tok.eos_ids == D.tokenizer().eos_ids
    # the route bank: the 100 taught problems SFT used, and 100 route-only for RL
    bank = D.load_jsonl(out / "routes.jsonl")
    r5 = f" + {D.ROUTE_RULES['deliver']} = "
    assert len(bank) == 200 and sum("deliver" in p.routes[0].text and r5 in p.routes[0].text for p in bank) >= 90
    assert all(r.get("n_taught", 0) + r.get("n_route_only", 0) == 21 for r in evals)

    train.main(["--stage", "eval", "--init", str(out), "--eval-n", "21", "--max-new-tokens", "40"])
    printed = capsys.readouterr().out
    assert "test (21 problems): acc_autonomous" in printed and "hard (21 problems)" in printed
    assert [json.loads(x)["split"] for x in (out / "eval.jsonl").read_text().splitlines()] == ["test", "hard"]


def test_bad_inputs_give_one_clear_line(tmp_path):
    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            train.main(list(argv))
        return str(e.value.code)

    assert fails("--stage", "eval", "--init", str(tmp_path / "nope")) == \
        f"error: {tmp_path / 'nope'}: no config.json (expected a Hugging Face model folder)"
    assert fails("--stage", "eval") == "error: --stage eval needs --init DIR (a checkpoint folder, e.g. out/distill)"
    assert fails("--stage", "distill", "--data", str(tmp_path / "x.jsonl")) == \
        f"error: {tmp_path / 'x.jsonl'}: no such file"
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("do not delete")
    msg = fails("--stage", "distill", "--out", str(tmp_path / "keep"), *TINY)
    assert "is not a run folder" in msg and (tmp_path / "keep" / "precious.txt").exists()
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"question": "q", "answer": "1", "routes": [{"text": "x", "correct": False}]}) + "\n")
    assert "no SFT example" in fails("--stage", "distill", "--data", str(tmp_path / "d.jsonl"),
                                     "--out", str(tmp_path / "o"))


def test_checkpoint_teacher_writes_a_labelled_bank(tmp_path):
    tok = D.tokenizer()
    torch.manual_seed(0)
    cfg = M.tiny_config(tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        max_position_embeddings=512)
    M.save_model(M.Transformer(cfg), tmp_path / "teacher", tok)
    teacher = M.load_model(tmp_path / "teacher", "cpu")
    problems = D.split("dev", 3)
    assert distill.teacher_prompt(problems[0], True).startswith("Rules : R1 restock adds 5 units")
    assert distill.teacher_prompt(problems[0], False) == problems[0].question + "\n"
    banks = distill.checkpoint_bank(teacher, tok, problems, R=2, n=3, max_new_tokens=8, batch_size=2)
    assert len(banks) == 3 and all(len(b) <= 4 for b in banks)
    for p, b in zip(problems, banks):  # a random teacher writes no "Answer : <right>" line: all negatives
        assert all(r.correct == D.check(mrpv.parse(r.text).answer, p.answer) for r in b)


def test_distill_from_a_checkpoint_on_jsonl_data(tmp_path):
    """The real-data path: --init a Hugging Face folder, --data a JSONL route bank, --eval-data JSONL."""
    tok = D.tokenizer()
    torch.manual_seed(0)
    cfg = M.tiny_config(tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        max_position_embeddings=512)
    M.save_model(M.Transformer(cfg), tmp_path / "student", tok)
    problems, banks = distill.embedded_set("train", 20, 2)
    D.save_jsonl([D.Problem(p.question, p.answer, None, b) for p, b in zip(problems, banks)], tmp_path / "bank.jsonl")
    train.main(["--stage", "distill", "--init", str(tmp_path / "student"), "--data", str(tmp_path / "bank.jsonl"),
                "--eval-data", str(tmp_path / "bank.jsonl"), "--steps", "3", "--batch-size", "4",
                "--max-new-tokens", "8", "--out", str(tmp_path / "run")])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows if "split" in r] == ["eval"] and rows[0]["lr"] < 1e-4  # checkpoint default lr
    assert M.load_model(tmp_path / "run", "cpu").config.hidden_size == 32


def test_the_distillation_sees_taught_problems_and_reading_drills_only(monkeypatch, tmp_path):
    """SFT examples come from taught problems (no delivery to the asked item, so R5 is never applied), plus
    reading drills: deliveries to the asked item in worlds where a delivery adds 1..6 (R5's 3 a sixth of them)."""
    seen, batches = [], []
    real, real_step = distill.sft_examples, distill.sft_step
    monkeypatch.setattr(distill, "sft_examples",
                        lambda problems, *a, **k: seen.append(problems) or real(problems, *a, **k))
    monkeypatch.setattr(distill, "sft_step",
                        lambda model, batch, *a: batches.append(batch) or real_step(model, batch, *a))
    train.main(["--stage", "distill", "--out", str(tmp_path / "d"), *TINY, "--steps", "3", "--mrpv-from", "0",
                "--mrpv-share", "1", "--eval-n", "0"])
    assert len(seen) == 3 and all(len(ps) == 100 and not any(D.route_only(p) for p in ps) for ps in seen[:2])
    assert all(D.route_only(p) for p in seen[2])
    assert any(not D.check(p.answer, D.problem_of(p.ledger).answer) for p in seen[2])
    tok = D.tokenizer()
    texts = [tok.decode(e[0] + e[1]) for b in batches for e in b]
    reading = [t for t in texts if re.search(r"^deliver ([A-D]) : \d+ \+ \d+ =", t, re.M)]
    # with --mrpv-share 1: reading drills and taught MRPV examples, about half each
    assert 0 < len(reading) < len(texts)


def test_verdict_drills_restate_and_skip_the_step():
    tok = D.tokenizer()
    drills = distill.verdict_drills(300, 3, random.Random(0), tok)
    for p, r, skip in drills:
        prompt, response = tok.decode(p), tok.decode(r)
        heads = prompt.split("\n")[:-2]
        own = prompt.split("\n")[-2].split(" : ")[1]
        assert 1 <= len(heads) <= 3 and prompt.split("\n")[-2] == f"Answer : {own}"
        lines = response.split("\n")
        assert [mrpv.parse(x).verdicts for x in lines] == [{k: None if h.endswith(f" {own}") else 0}
                                                           for k, h in enumerate(heads, 1)]
        for k, (h, line) in enumerate(zip(heads, lines), 1):
            theirs = h.split(" : ")[1]
            assert line.startswith(f"Route {k} : {theirs} {mrpv.relation(theirs, own)} {own} -> ")
        assert [tok.decode([r[j]]) for j in sorted(skip)] == \
            ["\n"] * (sum("wrong" in x for x in lines[:-1])) + [""] * ("wrong" in lines[-1])
        x, y = distill.sft_batch([(p, r, skip)], tok.pad_id, "cpu")
        assert (y != -100).sum() == len(r) - len(skip)  # the skipped positions carry no loss
    sounds = (sum(r.count(tok.encode(" sound")[0]) for _, r, _ in drills)
              / sum(len(tok.decode(p).split("\n")) - 2 for p, _, _ in drills))
    assert 0.4 < sounds < 0.6


def test_evaluate_scores_answers_and_verdicts_of_hand_written_completions(monkeypatch):
    """evaluate reads what the model wrote: right answers alone; with routes, the answer and the share of
    shown routes given the right verdict. Here the 'model' calls every route sound and answers right
    with routes, garbage alone."""
    problems, banks = distill.embedded_set("dev", 6, R=3)
    args = flags.parse(["--stage", "eval", "--init", "x"])

    def completions(model, tok, ps, routes, max_new_tokens):
        if not any(routes):
            return ["sell A 2 : garbage"] * len(ps)
        return ["".join(f"Route {k} : sound\n" for k in range(1, len(r) + 1)) + f"x\nAnswer : {p.answer}"
                for p, r in zip(ps, routes)]

    monkeypatch.setattr(evaluate, "completions", completions)
    alone = lambda model, tok, ps, n: [(p, D.teacher_route(p).text) for p in ps] + [(p, "garbage") for p in ps]
    monkeypatch.setattr(evaluate, "prior_samples", alone)  # each route-only problem: its right route, and garbage
    acc = evaluate.evaluate(None, None, problems, banks, args)
    deliveries = sum(len(D.delivery_counts(D.teacher_route(p).text, p.ledger)) for p in problems if D.route_only(p))
    assert (acc["rule_prior"], acc["rule_prior_lines"]) == (1.0, deliveries)
    shown = [mrpv.select_routes(b, args.K, args.neg_share, random.Random(f"eval-{i}")) for i, b in enumerate(banks)]
    sound = sum(r.correct for rs in shown for r in rs) / sum(len(rs) for rs in shown)
    # one Python division of the same integer counts: identical; rel 1e-12 only allows float64 rounding
    assert 0 < sound < 1 and acc["verdict_acc"] == pytest.approx(sound, rel=1e-12)
    assert (acc["acc_autonomous"], acc["acc_with_routes"]) == (0, 1)
    assert (acc["right_autonomous"], acc["right_with_routes"]) == ("000000", "111111")
    route_only = [D.route_only(p) for p in problems]
    assert acc["route_only"] == "".join("01"[x] for x in route_only) and acc["n_route_only"] == sum(route_only) > 0
    assert acc["n_taught"] == 6 - sum(route_only) > 0
    for part, keep in (("taught", [not x for x in route_only]), ("route_only", route_only)):
        assert (acc[f"acc_autonomous_{part}"], acc[f"acc_with_routes_{part}"]) == (0, 1)
        part_sound = [r.correct for rs, k in zip(shown, keep) if k for r in rs]
        assert acc[f"verdict_acc_{part}"] == pytest.approx(sum(part_sound) / len(part_sound), rel=1e-12)
    assert acc["verdict_acc_own_right"] == pytest.approx(sound, rel=1e-12) and acc["verdict_acc_own_wrong"] is None
    wrong = [r for rs in shown for r in rs if not r.correct and r.first_wrong]
    assert acc["step_acc"] == 0.0 and wrong  # "sound" names no step


DELIVERY_SUM = re.compile(r"^deliver ([A-D]) : \d+ \+ (\d+) =", re.M)


def delivery_amounts(text: str, asked: str) -> list[int]:
    """What each line of a chain that delivers to the asked item adds ("deliver C : 4 + 1 = 5 ..." -> 1)."""
    return [int(k) for item, k in DELIVERY_SUM.findall(text) if item == asked]


def test_reading_drills_deliver_in_worlds_only_their_routes_tell():
    """Each reading drill delivers to the asked item in a world of its own, whose amount only its routes tell; at
    rule share 0 no drill, and no route of one, right or wrong, ever adds what R5 adds: the distillation never
    writes the route-only rule, so the student can produce it only by reading a route."""
    r5 = D.ROUTE_RULES["deliver"]
    for share, want in ((0.0, set(D.DELIVER_AMOUNTS) - {r5}), (1.0, {r5}), (0.5, set(D.DELIVER_AMOUNTS) | {r5})):
        problems, banks = distill.reading_set(300, 3, seed=0, rule_share=share)
        worlds, written = set(), set()
        for p, bank in zip(problems, banks):
            assert D.route_only(p) and len(bank) == 6
            pos, negs = bank[0], bank[3:]
            assert pos.correct and D.extract_answer(pos.text) == p.answer
            assert p.rules.endswith(D.RULE_R5.format(p.world.deliver))
            assert all(not n.correct and n.first_wrong and D.extract_answer(n.text) != p.answer for n in negs)
            found = set(delivery_amounts(pos.text, p.ledger[2]))
            assert found == {p.world.deliver}  # one world per problem
            worlds |= found
            written |= {k for r in bank for k in delivery_amounts(r.text, p.ledger[2])}
        assert worlds == want
        if share == 0.0:
            assert r5 not in written