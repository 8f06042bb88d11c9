import json
import random

import pytest

import domain as D


def test_same_seed_same_problems_and_splits_disjoint():
    a, b = D.split("test", 50, seed=0), D.split("test", 50, seed=0)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in D.split("test", 50, seed=1)] != [p.question for p in a]
    qs = {name: {p.question for p in D.split(name, n)} for name, n in
          [("train", 3000), ("dev", 300), ("test", 500), ("hard", 300)]}
    assert len(qs["test"]) == 500  # no duplicates inside a split either
    for x in qs:
        for y in qs:
            assert x == y or not qs[x] & qs[y], (x, y)


def test_problem_shape_difficulty_and_guessing():
    train = D.split("train", 2100)
    events = [len(p.ledger[1]) for p in train]
    assert min(events) == 3 and max(events) == 8
    assert all(len(p.ledger[1]) in (7, 8) for p in D.split("hard", 200))
    counts = {}
    for p in train:
        counts[p.answer] = counts.get(p.answer, 0) + 1
    assert set(counts) == {str(i) for i in range(21)}
    assert max(counts.values()) / len(train) <= 0.05  # no constant guess scores above 5 %
    told = D.RULES + D.RULE_R5.format(D.ROUTE_RULES["deliver"])
    assert all(p.rules == told and p.rules not in p.question for p in train[:10])
    assert all(p.rules == D.RULES for p in D.split("train", 10, route_rule="none"))  # the four-rule domain: R5 untold


def test_route_only_half_of_every_split_and_what_it_means():
    """route_rule "deliver" (the default): a problem is route-only exactly when it delivers to the asked item; half of
    each split is, each half answer-balanced; R5 is applied there, deliveries elsewhere read "other"."""
    r5 = D.ROUTE_RULES["deliver"]
    for name, n in (("train", 420), ("dev", 210), ("hard", 84)):
        problems = D.split(name, n)
        route_only = [p for p in problems if D.route_only(p)]
        assert len(route_only) == n // 2
        for part in (route_only, [p for p in problems if not D.route_only(p)]):
            counts = {a: sum(p.answer == a for p in part) for a in {p.answer for p in part}}
            assert len(counts) == 21 and max(counts.values()) - min(counts.values()) <= 1  # answer-balanced
    problems = D.split("test", 300)
    kinds = {e[0] for p in problems for e in p.ledger[1]}
    assert kinds == {"sell", "restock", "return", "spoil", "deliver"}
    for p in problems:
        stock, events, asked = p.ledger
        deliveries = [i for i, e in enumerate(events) if e[0] == "deliver"]
        lines = D.teacher_route(p).text.split("\n")
        assert D.route_only(p) == any(events[i][1] == asked for i in deliveries)
        for i in deliveries:
            if events[i][1] != asked:
                assert " : other -> " in lines[i]
            else:
                before = int(lines[i - 1].rsplit(" ", 1)[1]) if i else stock[asked]
                after = before + r5
                want = f"deliver {asked} : {before} + {r5} = {after} -> {asked} = {after}"
                assert lines[i] == want or "> 20" in lines[i]
    # R5 is what a guess misses
    assert any(D.route_only(p) and not D.teacher_route(p, guided=False).correct for p in problems)
    assert D.route_only(D.Problem("q", "1")) is None  # a JSONL problem has no ledger, so no part


def test_the_four_rule_domain_is_drawn_as_before():
    """route_rule "none" keeps the domain that results before R5 were measured on: no delivery, no route-only problem,
    the same problems as make_problem draws from the split's old seed stream."""
    old = D.split("dev", 60, route_rule="none")
    rng = random.Random("ledger-dev-0")
    targets = [i % 21 for i in range(60)]
    rng.shuffle(targets)
    assert [p.question for p in old] == [D.make_problem(rng, D.SPLITS["dev"], t).question for t in targets]
    assert not any(e[0] == "deliver" for p in old for e in p.ledger[1]) and not any(D.route_only(p) for p in old)
    with pytest.raises(D.DataError, match="unknown route rule"):
        D.split("dev", 3, route_rule="R6")


def test_the_rule_prior_counts_delivery_lines_by_the_count_they_reach():
    """domain.rule_prior, on hand-written chains: a delivery line to the asked item applies R5 when the count it reaches
    is R5's, whatever amount it writes; lines on other items, other events and garbage are not counted."""
    r5 = D.ROUTE_RULES["deliver"]
    ledger = ({"A": 4, "B": 2, "C": 0}, [("deliver", "A", 0), ("deliver", "B", 0), ("restock", "A", 0)], "A")
    p = D.problem_of(ledger, "deliver")
    right = D.teacher_route(p).text
    assert f"deliver A : 4 + {r5} = {4 + r5} -> A = {4 + r5}" in right and D.rule_prior([(p, right)]) == (1.0, 1)
    chains = [f"deliver A : 4 + 6 = {4 + r5} -> A = {4 + r5}",  # a wrong sum that reaches R5's count: applied
              f"deliver A : 4 + {r5 + 4} = {8 + r5} -> A = {8 + r5}", "deliver A : other -> A = 4",  # not applied
              "deliver B : 2 + 3 = 5 -> A = 4", "restock A : 4 + 5 = 9 -> A = 9", "garbage", ""]  # not to A
    assert D.rule_prior([(p, c) for c in chains]) == (1 / 3, 3)
    assert D.rule_prior([(p, "garbage")]) == (None, 0) and D.rule_prior([]) == (None, 0)
    full = D.problem_of(({"A": 19, "B": 0, "C": 0}, [("deliver", "A", 0)], "A"), "deliver")  # R4 caps what R5 adds
    capped = "deliver A : 19 + 9 = 28 > 20 -> A = 20"
    assert D.rule_prior([(full, D.teacher_route(full).text), (full, capped)]) == (1.0, 2)


def test_routes_positive_negative_and_first_wrong_step():
    rng = random.Random(0)
    tok = D.tokenizer()
    kinds = set()
    for p in D.split("dev", 300):
        pos = D.teacher_route(p)
        assert pos.correct and D.check(pos.text.rsplit(" ", 1)[1], p.answer)
        neg = D.negative_route(p, rng)
        assert not neg.correct and not D.check(neg.text.rsplit(" ", 1)[1], p.answer)
        pl, nl = pos.text.split("\n"), neg.text.split("\n")
        k = neg.first_wrong
        assert len(pl) == len(nl) == len(p.ledger[1]) + 1
        assert pl[:k - 1] == nl[:k - 1] and pl[k - 1] != nl[k - 1]  # the first differing line is the first wrong step
        kinds.add(nl[k - 1].split(" : ")[1].split(" -> ")[0].replace(" ", "").strip("0123456789+-=/>") or "slip")
        for text in (p.question, pos.text, neg.text):
            assert tok.decode(tok.encode(text)) == text and tok.tok.token_to_id("<|unk|>") not in tok.encode(text)
    assert len(kinds) >= 3  # several kinds of mistake, not one
    rng = random.Random(2)
    delivered = [p for p in D.split("dev", 200) if D.route_only(p)]
    negatives = [D.negative_route(p, rng) for p in delivered for _ in range(3)]
    misapplied = {r.text.split("\n")[r.first_wrong - 1] for r in negatives}
    r5 = f" + {D.ROUTE_RULES['deliver']} = "
    assert any(line.startswith("deliver") and r5 not in line for line in misapplied)  # R5 misapplied is a mistake too


def test_every_problem_has_a_negative_route():
    """Even where later rules absorb early mistakes (a count of 0 kept at 0), a wrong route exists."""
    rng = random.Random(0)
    absorbing = D.make_problem(random.Random(0), D.Difficulty(min_events=8, p_asked=1.0), target=0)
    for p in [absorbing] + D.split("hard", 1000) + D.split("train", 1000, seed=5):
        neg = D.negative_route(p, rng)
        assert not neg.correct and neg.text.rsplit(" ", 1)[1] != p.answer and 1 <= neg.first_wrong <= len(p.ledger[1])


def test_negative_steps_are_each_checkable_against_the_rules():
    """Every line of a route before its first wrong step is what the rules give; the wrong line is not."""
    rng = random.Random(1)
    for p in D.split("test", 100):
        neg = D.negative_route(p, rng)
        stock, events, asked = p.ledger
        v = stock[asked]
        for i, (e, line) in enumerate(zip(events, neg.text.split("\n"))):
            work, v2 = D.apply(D.EXPERT, e, v) if e[1] == asked else ("other", v)
            right = f"{D.event_text(e)} : {work} -> {asked} = {v2}"
            assert (line == right) == (i + 1 < neg.first_wrong), (i, line, right)
            if i + 1 == neg.first_wrong:
                break
            v = v2


def test_teacher_without_rules_is_clearly_worse():
    problems = D.split("test", 500)
    guided = sum(D.teacher_route(p).correct for p in problems) / 500
    unguided = sum(D.teacher_route(p, guided=False).correct for p in problems) / 500
    assert guided == 1.0 and unguided < 0.35


@pytest.mark.parametrize("pred,ref,ok", [
    ("5", "5", True), (" 5 ", "5", True), ("5.0", "5", True), ("5.", "5", True), ("1,000", "1000", True),
    ("$1,000.50", "1000.5", True), ("+7", "7", True), ("-3", "-3", True), ("0.50", ".5", True), ("5", "6", False),
    ("", "5", False), (None, "5", False), ("five", "5", False), ("Paris", " paris ", True), ("1e3", "1000", True),
    ("9" * 5000, "9", False), ("1e999999999", "1", False), ("NaN", "NaN", True), ("inf", "5", False),
])
def test_answer_checker(pred, ref, ok):
    assert D.check(pred, ref) is ok


def test_checker_never_raises():
    rng = random.Random(0)
    pool = "0123456789.,-+eE$€%  \n\tαβ😀#/"
    for _ in range(3000):
        s = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        assert isinstance(D.normalize(s), str) and D.check(s, s) in (True, False)
    for weird in (object(), 3.5, ["5"], b"5", float("nan")):
        D.check(weird, "5")


def write(tmp_path, text, name="data.jsonl"):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_jsonl_loading_and_gsm8k_answers(tmp_path):
    f = write(tmp_path, "\n".join([
        json.dumps({"question": "Natalia sold 48 clips ...", "answer": "She sold 48/2 = 24 in May.\n#### 72"}),
        "",
        json.dumps({"question": "q2", "answer": 3, "rules": "r", "routes": [
            {"text": "x\nAnswer : 3", "correct": True}, {"text": "y", "correct": False, "first_wrong": 1}]}),
    ]))
    a, b = D.load_jsonl(f)
    assert a.answer == "72" and a.routes == [] and a.rules is None
    assert b.answer == "3" and b.rules == "r" and b.routes[1] == D.Route("y", False, 1)
    D.save_jsonl([a, b], tmp_path / "out.jsonl")
    assert D.load_jsonl(tmp_path / "out.jsonl") == [a, b]


@pytest.mark.parametrize("line,message", [
    ('{"question": "q"', "invalid JSON"),
    ('["q", "a"]', "expected a JSON object"),
    ('{"answer": "1"}', "'question' is missing"),
    ('{"question": "q"}', "'answer' is missing"),
    ('{"question": "q", "answer": true}', "'answer' is missing"),
    ('{"question": "q", "answer": "1", "routes": {"text": "x"}}', "'routes' must be a list"),
    ('{"question": "q", "answer": "1", "routes": [{"text": "x"}]}', "routes[0] needs 'text'"),
    ('{"question": "q", "answer": "1", "routes": [{"text": "x", "correct": false, "first_wrong": 0}]}', "first_wrong"),
    ('{"question": "q", "answer": "1", "rules": 5}', "'rules' must be a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    f = write(tmp_path, '{"question": "fine", "answer": "1"}\n' + line + "\n")
    with pytest.raises(D.DataError) as e:
        D.load_jsonl(f)
    assert str(e.value).startswith(f"{f}:2: ") and message in str(e.value)


def test_jsonl_empty_and_missing_files(tmp_path):
    with pytest.raises(D.DataError, match="no problems"):
        D.load_jsonl(write(tmp_path, "\n\n"))
    with pytest.raises(D.DataError, match="no such file"):
        D.load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(D.DataError, match="unknown split"):
        D.split("validation", 3)


@pytest.mark.parametrize("text,want", [
    ("She has 5 + 3 = 8 apples.\nAnswer: 8", "8"),
    ("The answer is $1,200 per day.", "1200"),
    ("so \\boxed{\\frac{1}{2}} -- no: \\boxed{42}.", "42"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("He pays 3 * 4 = 12 dollars, then 12 + 0.5 = 12.5", "12.5"),
    ("Answer : -7", "-7"),
    ("Final answer: 1,000,000", "1000000"),
    ("The final answer is 18.\nI hope it is correct: 3 checks.", "18"),
    ("x" * 100_000 + " 7", "7"),
])
def test_extract_answer_from_free_form_completions(text, want):
    assert D.check(D.extract_answer(text), want)


@pytest.mark.parametrize("garbage", ["", "   ", None, 42, ["Answer: 1"], "no number at all", "\\boxed{", "####",
                                     "Answer:", "\x00\ufffd" * 50, "9" * 5000])
def test_extract_answer_never_raises(garbage):
    a = D.extract_answer(garbage)
    assert a is None or isinstance(a, str)


def test_a_route_label_is_one_token_and_text_round_trips():
    tok = D.tokenizer()
    assert len(tok.encode("Route 3 :")) == 1 and len(tok.encode(" Route 3 :")) == 1
    assert tok.encode("Route 3 : 8") == tok.encode("Route 3 :") + tok.encode(" 8")
    for text in ["Route 1 : 10 > 1 -> wrong at step 2\nRoute 2 : 1 = 1 -> sound", "Route 12 : 3",
                 "Route 1 :\nAnswer : 4"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("Route 12 :")) == 3  # past 9 routes: the words one by one
