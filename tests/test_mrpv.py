import random

import pytest

import domain as D
import mrpv as P

VS = "verify-solve"  # the other order: verdicts first


@pytest.fixture(scope="module")
def case():
    p = D.split("dev", 1, seed=3)[0]
    pos, neg = D.teacher_route(p), D.negative_route(p, random.Random(0))
    return p, pos, neg


def test_zero_routes_is_the_autonomous_prompt(case):
    p, pos, neg = case
    assert P.build_prompt(p, []) == p.question + "\n"
    prompt = P.build_prompt(p, [neg, pos])
    tok = D.tokenizer()
    for order in P.ORDERS:
        response = P.teacher_response([neg, pos], pos.text, order)
        assert tok.decode(tok.encode(prompt + response)) == prompt + response  # every word is in the vocabulary


def rewards(r):
    return (r.answer, r.verdict, r.step, r.format, round(r.total, 6))


def test_hand_written_completions(case):
    """Verify-then-solve; the default order's own table is in test_solve_then_verify_layout."""
    p, pos, neg = case
    routes, s = [neg, pos], neg.first_wrong
    bad_steps = neg.text.replace("Answer", "Answers")  # the wrong route's steps, its answer line broken
    table = {
        "all right": (P.teacher_response(routes, pos.text, VS), (1.0, 1.0, 1.0, 1.0, 1.0)),
        "right answer, wrong verdicts": (f"Route 1 : sound\nRoute 2 : wrong at step 1\n{pos.text}",
                                         (1.0, 0.0, 0.0, 1.0, round(1.1 / 2.1, 6))),
        "wrong answer, right verdicts": (P.teacher_response(routes, neg.text, VS),
                                         (0.0, 1.0, 1.0, 1.0, round(1.1 / 2.1, 6))),
        "right verdicts, wrong step named": (f"Route 1 : wrong at step {s + 1}\nRoute 2 : sound\n{pos.text}",
                                             (1.0, 1.0, 0.0, 1.0, round(1.6 / 2.1, 6))),
        "wrong without a step": (f"Route 1 : wrong\nRoute 2 : sound\n{pos.text}",
                                 (1.0, 1.0, 0.0, 1.0, round(1.6 / 2.1, 6))),
        "one verdict missing": (f"Route 2 : sound\n{pos.text}", (1.0, 0.5, 0.0, 0.0, round(1.25 / 2.1, 6))),
        "no answer": (f"Route 1 : wrong at step {s}\nRoute 2 : sound\n{bad_steps}",
                      (0.0, 1.0, 1.0, 0.0, round(1.0 / 2.1, 6))),
        "garbage": ("lorem ipsum", (0.0, 0.0, 0.0, 0.0, 0.0)),
    }
    for name, (completion, want) in table.items():
        assert rewards(P.reward(completion, p, routes, order=VS)) == want, name


def test_no_routes_counts_answer_and_format_only(case):
    p, pos, neg = case
    assert rewards(P.reward(pos.text, p, [])) == (1.0, None, None, 1.0, 1.0)
    assert rewards(P.reward(neg.text, p, [])) == (0.0, None, None, 1.0, round(0.1 / 1.1, 6))
    verdict_first = "Route 1 : sound\n" + pos.text  # a verdict for a route that was not shown
    assert rewards(P.reward(verdict_first, p, [])) == (1.0, None, None, 0.0, round(1 / 1.1, 6))


def test_first_answer_counts_and_repeats_break_the_format(case):
    p, pos, _ = case
    wrong = str((int(p.answer) + 1) % 21)
    first_right = P.reward(f"{pos.text}\nAnswer : {wrong}", p, [])
    first_wrong = P.reward(pos.text.replace(f"Answer : {p.answer}", f"Answer : {wrong}\nAnswer : {p.answer}"), p, [])
    assert (first_right.answer, first_right.format) == (1.0, 0.0)
    assert (first_wrong.answer, first_wrong.format) == (0.0, 0.0)
    twice = P.reward("Route 1 : sound\nRoute 1 : wrong at step 2\n" + pos.text, p, [pos])
    assert twice.verdict == 1.0 and twice.format == 0.0


def test_weights_and_the_process_switch(case):
    p, pos, neg = case
    off = P.reward(P.teacher_response([neg], pos.text), p, [neg], P.Weights(step=0))
    assert off.step is None and off.total == 1.0
    answer_only = P.reward(P.teacher_response([neg], neg.text), p, [neg], P.Weights(verdict=0, step=0, format=0))
    assert answer_only.total == 0.0 and answer_only.verdict == 1.0


def test_fuzz_never_raises_and_stays_in_range(case):
    p, pos, neg = case
    rng = random.Random(0)
    pieces = ["Route 1 : sound", "Route 2 : wrong at step 3", "Route 99999 : wrong at step 99999999999",
              "Answer : 5", "Answer :", "answer: 1e99999", "ANSWER : ٣", "Route 1 : wrong", "Route -1 : sound",
              "😀" * 50, "\x00", "Answer : " + "9" * 10000, pos.text, neg.text, "", " ", "\n\n\n", "Route",
              ":", "->", "wrong at step", "Route 1 : sound extra"]
    cases = [None, 5, b"bytes", "x" * 200_000, "\n" * 10_000]
    for _ in range(3000):
        if rng.random() < 0.5:
            cases.append("\n".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))))
        else:
            cases.append("".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 80))))
    for c in cases:
        for routes in ([], [neg], [neg, pos], [pos, pos, neg]):
            r = P.reward(c, p, routes)
            for x in (r.answer, r.verdict, r.step, r.format, r.total):
                assert x is None or 0.0 <= x <= 1.0


def test_route_selection_mix_and_seed():
    bank = [D.Route(f"p{i}", True) for i in range(4)] + [D.Route(f"n{i}", False, 1) for i in range(4)]
    draw = lambda seed, share=0.5: [P.select_routes(bank, 3, share, random.Random(seed * 1000 + i)) for i in range(400)]
    a = draw(1)
    assert [[r.text for r in x] for x in a] == [[r.text for r in x] for x in draw(1)]
    n_neg = [sum(not r.correct for r in x) for x in a]
    assert all(len(x) == 3 for x in a) and n_neg.count(3) > 20 and n_neg.count(0) > 20  # all-wrong sets occur
    assert abs(sum(n_neg) / (3 * 400) - 0.5) < 0.06
    assert sum(sum(not r.correct for r in x) for x in draw(1, share=0.9)) / 1200 > 0.8
    orders = {tuple(r.correct for r in x) for x in a}
    assert len(orders) > 4  # shuffled, not negatives first
    short = P.select_routes(bank[:1] + bank[4:5], 3, 0.0, random.Random(0))
    assert len(short) == 2  # the bank runs short: fewer routes, topped up with wrong ones


def test_partly_shown_routes_are_judged_on_what_is_shown(case):
    p, pos, neg = case
    n_steps = len(neg.text.split("\n")) - 1
    whole = P.show(neg, 1.0)
    assert whole == neg
    before = P.show(neg, (neg.first_wrong - 1) / n_steps) if neg.first_wrong > 1 else None
    if before is not None:
        assert before.correct and before.first_wrong is None and "Answer" not in before.text
    after = P.show(neg, neg.first_wrong / n_steps)
    assert not after.correct and after.first_wrong == neg.first_wrong
    one = P.show(pos, 0.01)
    assert one.correct and one.text == pos.text.split("\n")[0]
    unknown = D.Route("a\nb\nAnswer : 3", False, None)
    assert P.show(unknown, 0.3) == unknown


def test_solve_then_verify_layout(case):
    p, pos, neg = case
    routes = [neg, pos]
    response = P.teacher_response(routes, pos.text)
    assert response == P.teacher_response(routes, pos.text, "solve-verify")  # the default
    mine, theirs = p.answer, neg.text.rsplit(" ", 1)[1]
    rel = "<" if int(theirs) < int(mine) else ">"
    assert response == pos.text + (f"\nRoute 1 : {theirs} {rel} {mine} -> wrong at step {neg.first_wrong}"
                                   f"\nRoute 2 : {mine} = {mine} -> sound")
    assert rewards(P.reward(response, p, routes)) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert P.reward(response, p, routes, order=VS).format == 0.0  # the other order breaks the format, not the rest
    assert P.reward(P.teacher_response(routes, pos.text, VS), p, routes).format == 0.0
    s = neg.first_wrong
    table = {  # the default layout on hand-written completions
        "right answer, wrong verdicts": (f"{pos.text}\nRoute 1 : sound\nRoute 2 : wrong at step 1",
                                         (1.0, 0.0, 0.0, 1.0, round(1.1 / 2.1, 6))),
        "wrong answer, right verdicts": (P.teacher_response(routes, neg.text),
                                         (0.0, 1.0, 1.0, 1.0, round(1.1 / 2.1, 6))),
        "no verdicts": (pos.text, (1.0, 0.0, 0.0, 0.0, round(1.0 / 2.1, 6))),
        "verdicts, then steps": (f"Route 1 : wrong at step {s}\nRoute 2 : sound\n{pos.text}",
                                 (1.0, 1.0, 1.0, 0.0, round(2.0 / 2.1, 6))),
    }
    for name, (completion, want) in table.items():
        assert rewards(P.reward(completion, p, routes)) == want, name
    assert P.teacher_response([], pos.text) == P.teacher_response([], pos.text, VS) == pos.text  # the autonomous one
    assert P.build_prompt(p, []) == p.question + "\n"
    prompt = P.build_prompt(p, routes)
    # the routes with their answer lines under headers that name their results, then the question
    assert prompt == f"Route 1 : {theirs}\n{neg.text}\nRoute 2 : {mine}\n{pos.text}\n{p.question}\n"
    bare = pos.text + f"\nRoute 1 : wrong at step {neg.first_wrong}\nRoute 2 : sound"  # verdicts that restate nothing
    assert rewards(P.reward(bare, p, routes)) == (1.0, 1.0, 1.0, 1.0, 1.0)
    tok = D.tokenizer()
    assert tok.decode(tok.encode(prompt + response)) == prompt + response
    with pytest.raises(ValueError, match="order 'sideways' is not one of solve-verify, verify-solve"):
        P.teacher_response(routes, pos.text, "sideways")
    with pytest.raises(ValueError, match="order 'sideways'"):
        P.reward(response, p, routes, order="sideways")


def test_consistency_credits_verdicts_only_when_they_agree_with_the_own_answer(case):
    p, pos, neg = case
    c = P.Weights(consistent=True)
    right = P.teacher_response([neg, pos], pos.text)
    assert rewards(P.reward(right, p, [neg, pos], c)) == (1.0, 1.0, 1.0, 1.0, 1.0)
    # the right verdicts, then the wrong route's answer as its own: it calls wrong the route it copies and
    # sound the one it contradicts, so neither verdict earns (without consistency both do)
    copied = P.teacher_response([neg, pos], neg.text)
    assert (P.reward(copied, p, [neg, pos], c).verdict, P.reward(copied, p, [neg, pos]).verdict) == (0.0, 1.0)
    # consistent with its (wrong) answer: route 1 sound, route 2 wrong: consistent but not right, no credit
    follows = P.reward(f"{neg.text}\nRoute 1 : sound\nRoute 2 : wrong at step 1", p, [neg, pos], c)
    assert follows.verdict == 0.0
    assert P.reward(pos.text, p, [neg, pos], c).verdict == 0.0  # no verdicts, no credit
    no_answer = P.reward(right.replace("Answer", "Answers"), p, [neg, pos], c)
    assert no_answer.verdict == 0.0  # no own answer to agree with: whole routes earn nothing
    cut = P.show(neg, neg.first_wrong / (len(neg.text.split("\n")) - 1))  # no answer line shown: judged as before
    if cut.text != neg.text:
        assert P.reward(P.teacher_response([cut], neg.text), p, [cut], c).verdict == 1.0


def test_always_sound_beats_chance_on_the_routes_eaai_cuts():
    """Over the prompts EAAI shows, a wrong route cut before its error is sound (choice 2), so 'always sound'
    earns more than half of the verdict reward (Binomial, choice 4: half the routes wrong) and 'always wrong' less."""
    import distill
    import eaai
    problems, banks = distill.embedded_set("dev", 150, R=3)
    rng = random.Random(0)

    def constant(verdict):
        ann = eaai.Annealer(eaai.Schedule("linear", 0, 100), 3, seed=1)
        got = []
        for step in range(0, 100, 5):
            for p, b in zip(problems, banks):
                h = ann.hint(step)
                if h.show:
                    shown = [P.show(r, h.frac) for r in P.select_routes(b, h.k, 0.5, rng)]
                    text = "".join(f"Route {k} : {verdict}\n" for k in range(1, len(shown) + 1)) + "x\nAnswer : 1"
                    got.append(P.reward(text, p, shown).verdict)
        return sum(got) / len(got)

    assert constant("sound") > 0.6 and constant("wrong") < 0.4


def test_verdict_lines_of_tokens():
    pieces = ["sell", " A", " 2", " : other\n", "Answer", " : 3\nRoute", " 1 : sound", "\n",
              "Route 2 : wrong at step 1"]
    assert P.on_verdict_lines(pieces) == [False] * 6 + [True] * 3
    assert P.on_verdict_lines([]) == []
    assert P.on_verdict_lines(["garbage\n", "\n"]) == [False, False]


def test_restated_verdicts_compare_at_the_shown_depth(case):
    """A verdict line restates the route's result against the own one (choice 8): the answers for a route shown
    whole, the counts after as many step lines as a cut route shows; "=" exactly when they check equal."""
    p, pos, neg = case
    k = neg.first_wrong
    cut = P.show(neg, (k - 1) / (len(neg.text.split("\n")) - 1)) if k > 1 else None
    if cut is not None and cut.text != neg.text:  # cut before its error: sound, and equal to the own count there
        count = cut.text.rsplit(" ", 1)[1]
        assert P.verdict_line(1, cut, pos.text) == f"Route 1 : {count} = {count} -> sound"
    shown = P.show(neg, k / (len(neg.text.split("\n")) - 1))  # cut at its error: wrong, its count differs
    theirs, mine = shown.text.rsplit(" ", 1)[1], pos.text.split("\n")[k - 1].rsplit(" ", 1)[1]
    if shown.text != neg.text:
        assert P.build_prompt(p, [shown]).startswith(f"Route 1 : {theirs}\n")
        assert P.verdict_line(1, shown, pos.text) == \
            f"Route 1 : {theirs} {P.relation(theirs, mine)} {mine} -> wrong at step {k}"
        assert theirs != mine
    assert [P.relation(a, b) for a, b in (("8", "13"), ("13", "8"), ("5.0", "5"), ("Paris", " paris"), ("x", "y"))] == \
        ["<", ">", "=", "=", "vs"]
    for line in ("Route 2 : 8 < 13 -> wrong at step 3", "Route 2 : Paris vs Rome -> wrong",
                 "Route 2 : wrong at step 3"):
        assert P.parse(line).verdicts == {2: 3 if "step" in line else 0}
    assert P.parse("Route 2 : 8 13 -> sound").verdicts == {}  # no relation: not a verdict line


def test_restated_verdicts_of_free_form_answers_and_of_routes_without_answer_lines(case):
    """An answer with spaces restates as one word, so the teacher's own response scores in full; for a route shown
    without its answer line (cut, as EAAI shows it) the header and the verdict line both restate its last count."""
    p = D.Problem("Which city ?", "New York")
    right, wrong = D.Route("look it up\nAnswer : New York", True), D.Route("guess\nAnswer : Boston", False, 1)
    response = P.teacher_response([wrong, right], "look it up\nAnswer : New York")
    assert response.endswith("Route 1 : Boston vs New_York -> wrong at step 1\nRoute 2 : New_York = New_York -> sound")
    r = P.reward(response, p, [wrong, right])
    assert (r.answer, r.verdict, r.step, r.format) == (1.0, 1.0, 1.0, 1.0)
    q, pos, neg = case
    k = len(P.step_lines(neg.text))
    cut = D.Route("\n".join(P.step_lines(neg.text)), False, neg.first_wrong)  # every step line, no answer line
    theirs, mine = P.result(cut.text), P.step_lines(pos.text)[k - 1].rsplit(" ", 1)[1]
    assert theirs == P.result(neg.text)  # the last count is the answer
    assert P.build_prompt(q, [cut]).startswith(f"Route 1 : {theirs}\n")
    assert P.verdict_line(1, cut, pos.text).startswith(f"Route 1 : {theirs} {P.relation(theirs, mine)} {mine} -> wrong")
