"""The vertical domain: problems, the expert rules, routes written by teachers, the answer checker,
JSONL files, and the embedded default domain that needs no download.

The embedded domain is a stock ledger whose answer depends on rules the question does not state:

    Stock : A = 3 , B = 5 , C = 2 . Events : sell B 9 ; restock B ; spoil B ; sell A 2 . How many B ?

    sell B 9 : 9 > 5 no sale -> B = 5          <- R2: a sale larger than the stock sells nothing
    restock B : 5 + 5 = 10 -> B = 10           <- R1: restock adds 5
    spoil B : 10 / 2 = 5 -> B = 5              <- R3: spoilage halves the stock, rounding down
    sell A 2 : other -> B = 5                  <- another item: the asked count is restated
    Answer : 5

By default a fifth rule, R5 (a delivery adds 1 unit), is one that only the teacher's routes carry: the
distillation never applies it, while half of the problems of RL, dev, test and hard deliver to the asked
item ("route-only" problems; the others are "taught"). The distilled student is then right on what it
was taught and wrong on deliveries for a reason, and the routes hold what it lacks (choice 5).

A teacher that is told the rules (EXPERT) writes such routes; one that is not (GUESSED) assumes
plausible but wrong rules. Negative routes make one decisive mistake (a rule misapplied, a forgotten
exception, an arithmetic or copy slip) and then go on consistently to a wrong answer.

Choices that are ours (the paper uses real vertical domains; this one stands in for them on a CPU):
1. The ledger, its four rules, and the route format: one line per event, each ending with the asked
   item's count (a tiny model learns such chains faster than ones that restate only the changed item).
2. Answers are spread evenly over 0..20 (rejection sampling), so a constant guess scores 1/21 < 5 %.
3. Difficulty: 3-8 events, 3 items, half the events on the asked item for train / dev / test; the
   "hard" split keeps to the hard end of what training covers: 7-8 events, three quarters of them on
   the asked item (more rules applied per problem), rather than lengths never trained on.
4. A word-level vocabulary (every number 0..99, item and keyword one token): reading multi-character
   numbers is what a tiny character-level model fails at, not the reasoning. A route's label
   ("Route 2 :", up to 9 routes; PHRASES) is one token too, so that a verdict finds the route it judges
   by one token's match (in a probe, labels that were distinct tokens made a tiny student learn that
   lookup sooner: RESULTS.md, "Routes that carry a rule the start lacks").
5. Route-only knowledge (ROUTE_RULES): the paper's routes come from a stronger teacher and hold what the
   small model does not know; here that is R5, a rule of a sixth event kind (deliver) that the distillation
   never writes where it applies: its problems never deliver to the asked item (deliveries to other items are
   in them, so the word is known and such lines read "other"), and its reading drills deliver in worlds that
   add one of DELIVER_AMOUNTS (4 to 12), never R5's 1, or order (an event kind of the drills alone, adding
   one of ORDER_AMOUNTS: distill.py choice 5). R5 adds 1, away from what a student guesses for a delivery on
   its own (what restock and its drills add); rule_prior measures how often its own samples apply R5 anyway.
   `deliver3` (R5 adds 3, among the amounts a student guesses) and `none` (four rules, five event kinds,
   every problem taught) are the other rules. Dev, test, hard and the RL problems are half taught, half
   route-only (ROUTE_ONLY_SHARE), each half with every answer equally often.
"""

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

from tokenizer import Tokenizer, build_tokenizer


class DataError(ValueError):
    """Bad data: the message is one line naming the file and the line."""


# ---- problems and routes ----

@dataclass
class Route:
    text: str  # step lines, then "Answer : X"
    correct: bool
    first_wrong: int | None = None  # 1-based index of the first wrong step line; None if correct or unknown


@dataclass
class Problem:
    question: str
    answer: str
    rules: str | None = None  # the expert knowledge, for the teacher only
    routes: list[Route] = field(default_factory=list)  # from a JSONL file; empty for the embedded domain
    ledger: tuple | None = None  # embedded domain: (stock dict, events, asked item), for its teachers
    world: "Rules | None" = None  # embedded domain: the rules its answer follows (expert, but for reading drills)


# ---- the embedded domain: a stock ledger under hidden rules ----

ITEMS = "ABCD"
MAX_ANSWER = 20  # answers are 0..20
RULES = ("R1 restock adds 5 units . R2 a sale larger than the stock sells nothing . "
         "R3 spoil halves the stock , rounding down . "
         "R4 a shelf holds at most 20 units ; anything above is thrown away .")
RULE_R5 = " R5 a delivery adds {} units ."  # told to the teacher where a rule only routes carry (choice 5)
ROUTE_RULES = {"deliver": 1, "deliver3": 3, "none": None}  # the rule only routes carry: what R5 adds, or no R5
DELIVER_AMOUNTS = tuple(range(4, 13))  # what a delivery adds in reading drills' worlds and in wrong routes (choice 5)
ORDER_AMOUNTS = tuple(range(1, 13))  # what an order adds in the worlds of the reading drills that order (choice 5)
KINDS = ("sell", "sell", "restock", "return", "spoil")  # event kinds, drawn uniformly; + "deliver" with a route rule
ROUTE_ONLY_SHARE = 0.5  # of a split's problems, with a route rule (train: RL's half; distillation: the taught half)


@dataclass(frozen=True)
class Rules:
    """How a writer of routes applies the events. EXPERT are the domain's rules; GUESSED is what a
    teacher that was not told them assumes."""
    restock: int = 5  # R1
    oversell: str = "nothing"  # R2: "nothing" sells nothing; "all" empties the shelf
    spoil: str = "half"  # R3: "half" rounds down; "minus1" removes one unit
    cap: int | None = 20  # R4
    deliver: int = ROUTE_RULES["deliver"]  # R5, the route-only rule (choice 5; expert() sets another route rule's)
    order: int = 0  # an order: an event kind of reading drills alone, adding what their world says (choice 5)


EXPERT = Rules()


def expert(route_rule: str) -> Rules:
    """The domain's rules with `route_rule`'s R5 (choice 5): what the guided teacher is told and applies."""
    if route_rule not in ROUTE_RULES:
        raise DataError(f"unknown route rule {route_rule!r} (rules: {', '.join(ROUTE_RULES)})")
    return replace(EXPERT, deliver=ROUTE_RULES[route_rule] or EXPERT.deliver)
GUESSED = Rules(restock=10, oversell="all", spoil="minus1", cap=None, deliver=10)


@dataclass(frozen=True)
class Difficulty:
    min_events: int = 3
    max_events: int = 8
    items: int = 3
    p_asked: float = 0.5  # probability that an event concerns the asked item
    max_stock: int = 9  # initial stocks are 0..max_stock


SPLITS = {"train": Difficulty(), "dev": Difficulty(), "test": Difficulty(),
          "hard": Difficulty(min_events=7, max_events=8, p_asked=0.75),
          "fresh": Difficulty(),  # train's difficulty, its own stream: RL problems the distillation never saw
          "reading": Difficulty()}  # ledgers of the reading drills (distill.reading_set), their own stream
# evaluated a split: one standard error <= 2.2 points on dev, 1.6 on the others
EVAL_SIZES = {"dev": 500, "test": 1000, "hard": 1000}
WORDS = ([str(i) for i in range(100)] + list(ITEMS) +
         "Stock : = , . Events ; How many ? sell restock return spoil other -> + - / > no sale all sold "
         "Answer Route sound wrong at step deliver order <".split())


PHRASES = [f"Route {k} :" for k in range(1, 10)]  # a route's label is one token (choice 4)


def tokenizer() -> Tokenizer:
    """The embedded domain's word-level tokenizer (see tokenizer.build_tokenizer)."""
    return build_tokenizer(WORDS, PHRASES)


def event_text(event):
    kind, item, n = event
    return f"{kind} {item} {n}" if kind in ("sell", "return") else f"{kind} {item}"


def apply(rules: Rules, event, v):
    """One event on the asked item's count v -> (the working shown in the route, the new count)."""
    kind, _, n = event
    if kind == "sell":
        if n > v:
            return (f"{n} > {v} no sale", v) if rules.oversell == "nothing" else (f"{n} > {v} all sold", 0)
        return f"{v} - {n} = {v - n}", v - n
    if kind == "spoil":
        return ((f"{v} / 2 = {v // 2}", v // 2) if rules.spoil == "half"
                else (f"{v} - 1 = {max(v - 1, 0)}", max(v - 1, 0)))
    add = {"restock": rules.restock, "deliver": rules.deliver, "order": rules.order}.get(kind, n)
    if rules.cap is not None and v + add > rules.cap:
        return f"{v} + {add} = {v + add} > {rules.cap}", rules.cap
    return f"{v} + {add} = {v + add}", v + add


def write_route(ledger, rules: Rules = EXPERT, slip=None) -> tuple[str, int]:
    """Write the route for a ledger under `rules` -> (text, final count). slip = (step, line, count)
    replaces step `step` (0-based) with a wrong line and count; later steps follow on consistently."""
    stock, events, asked = ledger
    v, lines = stock[asked], []
    for i, event in enumerate(events):
        if slip is not None and slip[0] == i:
            line, v = slip[1], slip[2]
        elif event[1] == asked:
            work, v = apply(rules, event, v)
            line = f"{event_text(event)} : {work} -> {asked} = {v}"
        else:
            line = f"{event_text(event)} : other -> {asked} = {v}"
        lines.append(line)
    return "\n".join(lines + [f"Answer : {v}"]), v


def random_ledger(rng: random.Random, d: Difficulty, kinds=KINDS):
    items = ITEMS[:d.items]
    stock = {x: rng.randint(0, d.max_stock) for x in items}
    asked = rng.choice(items)
    events = []
    for _ in range(rng.randint(d.min_events, d.max_events)):
        item = asked if rng.random() < d.p_asked else rng.choice([x for x in items if x != asked])
        kind = rng.choice(kinds)
        n = rng.randint(1, 9) if kind == "sell" else rng.randint(1, 5) if kind == "return" else 0
        events.append((kind, item, n))
    return stock, events, asked


def delivers_to_asked(ledger) -> bool:
    """Whether a ledger applies what only routes tell: R5, a delivery to the asked item (choice 5), or, in a
    reading drill, an order to it."""
    _, events, asked = ledger
    return any(kind in ("deliver", "order") and item == asked for kind, item, _ in events)


CHAIN_LINE = re.compile(r"^(\w+) ([A-D])\b.* -> ([A-D]) = (\d+)$")


def delivery_counts(text: str, ledger) -> list[tuple[int, int]]:
    """(count before, count after) of each line of a chain for `ledger` that delivers to the asked item, as the chain
    itself has them: before is the count its previous line reached (the stock for the first), whatever the working."""
    stock, _, asked = ledger
    count, out = stock[asked], []
    for line in text.split("\n"):
        m = CHAIN_LINE.match(line.strip())
        if m and m.group(3) == asked:
            if m.group(1) == "deliver" and m.group(2) == asked:
                out.append((count, int(m.group(4))))
            count = int(m.group(4))
    return out


def rule_prior(samples) -> tuple[float | None, int]:
    """[(problem, a chain written for it)] -> (the share of their delivery lines to the asked item whose count is
    what the problem's R5 gives, or None without such lines; the number of lines): how often a student applies the
    route-only rule on its own. Judged by the count, not by the amount written ("4 + 6 = 5" applies R5 = 1)."""
    lines = [after == apply(p.world, ("deliver", p.ledger[2], 0), before)[1]
             for p, text in samples for before, after in delivery_counts(text, p.ledger)]
    return (sum(lines) / len(lines) if lines else None), len(lines)


def route_only(problem: Problem) -> bool | None:
    """Whether an embedded problem needs what only the routes carry (R5); None for a problem without a ledger."""
    return None if problem.ledger is None else delivers_to_asked(problem.ledger)


def problem_of(ledger, route_rule: str = "none", rules: Rules | None = None) -> Problem:
    """The question a ledger asks, its answer under `rules` (default: route_rule's expert ones; a reading
    drill's world, distill.reading_set), and the rules a teacher is told (R5 with the world's amount)."""
    rules = rules or expert(route_rule)
    stock, events, asked = ledger
    question = (f"Stock : {' , '.join(f'{x} = {n}' for x, n in stock.items())} . "
                f"Events : {' ; '.join(event_text(e) for e in events)} . How many {asked} ?")
    told = RULES + (RULE_R5.format(rules.deliver) if route_rule != "none" else "")
    return Problem(question, str(write_route(ledger, rules)[1]), told, [], ledger, rules)


def make_problem(rng: random.Random, d: Difficulty = Difficulty(), target: int | None = None) -> Problem:
    """A random ledger of the four-rule domain whose answer is `target` (drawn from 0..MAX_ANSWER when
    None): rejection sampling."""
    target = rng.randint(0, MAX_ANSWER) if target is None else target
    while True:
        ledger = random_ledger(rng, d)
        text, answer = write_route(ledger)
        if answer == target:
            return problem_of(ledger)


def eval_splits(text: str) -> list[str]:
    """The value of train.py's --eval-splits: 'test,hard' -> ['test', 'hard'], refusing an unknown split, or none."""
    splits = [s for s in text.split(",") if s]
    bad = [s for s in splits if s not in EVAL_SIZES]
    if bad or not splits:
        raise DataError(f"--eval-splits: {f'unknown split {bad[0]!r}' if bad else 'no split given'} (dev, test, hard)")
    return splits


def split(name: str, n: int, seed: int = 0, route_rule: str = "deliver") -> list[Problem]:
    """n problems of a split, every answer 0..MAX_ANSWER equally often (so no constant guess beats
    1/21 by more than one problem); with a route rule (not "none"), ROUTE_ONLY_SHARE of them route-only, each
    half answer-balanced on its own (choice 5). Each split draws from its own seed stream, so splits are
    disjoint (up to chance collisions, which the tests measure as none at these sizes)."""
    if name not in SPLITS:
        raise DataError(f"unknown split {name!r} (splits: {', '.join(SPLITS)})")
    rules = expert(route_rule)
    if route_rule == "none":  # the four-rule domain: rejection sampling of each answer in turn
        rng = random.Random(f"ledger-{name}-{seed}")
        targets = [i % (MAX_ANSWER + 1) for i in range(n)]
        rng.shuffle(targets)
        return [make_problem(rng, SPLITS[name], t) for t in targets]
    # Each ledger drawn fills a free place of its (answer, route-only) kind, or is dropped: within a kind,
    # the ledgers are those that rejection sampling of that kind would give, at a fraction of the draws.
    rng = random.Random(f"ledger-{route_rule}-{name}-{seed}")
    n_route = round(n * ROUTE_ONLY_SHARE)
    free = Counter([(i % (MAX_ANSWER + 1), False) for i in range(n - n_route)] +
                   [(i % (MAX_ANSWER + 1), True) for i in range(n_route)])
    problems = []
    while len(problems) < n:
        ledger = random_ledger(rng, SPLITS[name], KINDS + ("deliver",))
        kind = (write_route(ledger, rules)[1], delivers_to_asked(ledger))
        if free[kind]:
            free[kind] -= 1
            problems.append(problem_of(ledger, route_rule, rules))
    rng.shuffle(problems)
    return problems


# ---- teachers ----

def teacher_route(problem: Problem, guided: bool = True) -> Route:
    """The programmatic teacher: told the rules of the problem's world (guided) it is always right; without
    them it applies GUESSED, right only where no rule it guesses wrong comes into play."""
    text, answer = write_route(problem.ledger, problem.world if guided else GUESSED)
    return Route(text, check(str(answer), problem.answer))


def mistake(event, v, rng: random.Random, rules: Rules = EXPERT):
    """A wrong working for one event on count v -> (working, wrong count): a rule of `rules` misapplied or
    an exception forgotten where the event allows one, else an arithmetic slip."""
    kind, _, n = event
    wrong_rules = []
    if kind == "restock":
        wrong_rules.append(Rules(restock=rng.choice([3, 4, 6, 10])))  # R1 misapplied
    if kind == "sell" and n > v:
        wrong_rules.append(Rules(oversell="all"))  # R2 forgotten
    if kind == "spoil":
        wrong_rules.append(Rules(spoil="minus1"))  # R3 misapplied
    if kind == "deliver":
        wrong_rules.append(Rules(deliver=rng.choice([x for x in DELIVER_AMOUNTS if x != rules.deliver])))  # R5 wrong
    if kind == "order":
        wrong_rules.append(Rules(order=rng.choice([x for x in ORDER_AMOUNTS if x != rules.order])))  # amount misread
    added = {"restock": EXPERT.restock, "deliver": rules.deliver, "order": rules.order, "return": n}.get(kind)
    if added is not None and v + added > EXPERT.cap:
        wrong_rules.append(replace(rules, cap=None))  # R4 forgotten
    if wrong_rules and rng.random() < 0.75:
        return apply(rng.choice(wrong_rules), event, v)
    work, right = apply(rules, event, v)
    w = max(0, right + rng.choice([-2, -1, 1, 2]))
    return re.sub(r"= \d+$", f"= {w}", work), w  # the working's result is off (or only the restated count)


def negative_route(problem: Problem, rng: random.Random) -> Route:
    """A plausible wrong route: one decisive mistake at one step, then consistent to a wrong answer
    (right and wrong as the problem's world says)."""
    rules, (stock, events, asked) = problem.world, problem.ledger
    counts = [stock[asked]]  # the true count before each step, and after the last
    for e in events:
        counts.append(apply(rules, e, counts[-1])[1] if e[1] == asked else counts[-1])
    on_asked = [i for i, e in enumerate(events) if e[1] == asked]
    for _ in range(100):
        i = rng.choice(on_asked) if on_asked and rng.random() < 0.8 else rng.randrange(len(events))
        e, v = events[i], counts[i]
        if e[1] == asked:
            work, w = mistake(e, v, rng, rules)
            line = f"{event_text(e)} : {work} -> {asked} = {w}"
        else:  # a copy slip: the restated count is off by one
            w = v + rng.choice([-1, 1]) if v > 0 else 1
            line = f"{event_text(e)} : other -> {asked} = {w}"
        if w == counts[i + 1]:
            continue
        text, answer = write_route(problem.ledger, rules, slip=(i, line, w))
        if str(answer) != problem.answer:
            return Route(text, False, i + 1)
    # Later rules can absorb every early mistake (a count of 0 that sales and spoilage keep at 0):
    # then the slip goes to the last step, whose count is the answer.
    i, e, w = len(events) - 1, events[-1], counts[-1] + 1
    work = re.sub(r"= \d+$", f"= {w}", apply(rules, e, counts[-2])[0]) if e[1] == asked else "other"
    text, _ = write_route(problem.ledger, rules, slip=(i, f"{event_text(e)} : {work} -> {asked} = {w}", w))
    return Route(text, False, i + 1)


# ---- the answer checker ----

NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def normalize(answer) -> str:
    """Canonical form of an answer; never raises. Numbers lose thousands separators, currency signs,
    a trailing full stop and trailing zeros ('$1,000.50' -> '1000.5'); other text is lower-cased with
    whitespace collapsed."""
    s = " ".join(str(answer).split()).strip().rstrip(".").lower()
    num = s.replace(",", "").lstrip("$€£").rstrip("%")
    if len(num) <= 64 and NUMBER.fullmatch(num):
        try:
            d = Decimal(num)
            if d.is_finite() and abs(d.adjusted()) < 30:
                s = format(d.normalize() if d else Decimal(0), "f")  # '-0', '0.0' -> '0'
        except (InvalidOperation, ValueError):
            pass
    return s


def check(predicted, answer) -> bool:
    """Whether a predicted answer equals the reference after normalization; never raises."""
    if predicted is None:
        return False
    p = normalize(predicted)
    return p != "" and p == normalize(answer)


ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?::|is)\s*(.+)", re.IGNORECASE)
NUMBER_IN_TEXT = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def boxed(text: str):
    """The content of the last \\boxed{...}, braces balanced; None when there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, min(len(text), i + 1000)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text) -> str | None:
    """The final answer of a free-form (e.g. GSM8K) completion; never raises, None when there is none.
    In order: the last 'Answer: X' (or 'The answer is X') line, the last \\boxed{X}, the last '#### X',
    else the last number in the text. Where X holds a number, the number is kept ('$1,200 per day'
    -> '$1,200', which normalize() reads as 1200)."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = text[-20000:]  # the end of a runaway completion is where its answer is
    found = None
    for line in reversed(text.strip().split("\n")):
        if m := ANSWER_LINE.search(line):
            found = m.group(1)
            break
    if found is None:
        found = boxed(text)
    if found is None and "####" in text:
        found = text.rsplit("####", 1)[1].strip().split("\n")[0]
    if found is None:
        numbers = NUMBER_IN_TEXT.findall(text)
        return numbers[-1] if numbers else None
    numbers = NUMBER_IN_TEXT.findall(found)
    found = numbers[0] if numbers else found.strip().rstrip(".")
    return found or None


# ---- JSONL files ----

def gsm8k_answer(answer: str) -> str:
    """GSM8K writes its solution, then '#### 42': keep what follows the last '####'."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def load_jsonl(path) -> list[Problem]:
    """One JSON object a line: question and answer required; rules (teacher only) and routes
    ([{"text": ..., "correct": true|false, "first_wrong": step (optional)}]) optional."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    problems = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
            q, a = d.get("question"), d.get("answer")
            if not isinstance(q, str) or not q.strip():
                raise DataError(f"{where}: 'question' is missing or not a non-empty string")
            if isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip():
                raise DataError(f"{where}: 'answer' is missing or not a string or number")
            rules = d.get("rules")
            if rules is not None and not isinstance(rules, str):
                raise DataError(f"{where}: 'rules' must be a string")
            routes = d.get("routes", [])
            if not isinstance(routes, list):
                raise DataError(f"{where}: 'routes' must be a list")
            parsed = []
            for k, r in enumerate(routes):
                if not (isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("correct"), bool)):
                    raise DataError(f"{where}: routes[{k}] needs 'text' (string) and 'correct' (true or false)")
                fw = r.get("first_wrong")
                if fw is not None and (isinstance(fw, bool) or not isinstance(fw, int) or fw < 1):
                    raise DataError(f"{where}: routes[{k}].first_wrong must be a step number >= 1")
                parsed.append(Route(r["text"], r["correct"], fw))
            problems.append(Problem(q, gsm8k_answer(str(a)), rules, parsed))
    if not problems:
        raise DataError(f"{path}: no problems (the file is empty)")
    return problems


def save_jsonl(problems, path):
    """Write problems as JSONL (the embedded domain's structured ledger is not written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            d = {"question": p.question, "answer": p.answer, "rules": p.rules,
                 "routes": [{"text": r.text, "correct": r.correct, "first_wrong": r.first_wrong} for r in p.routes]}
            f.write(json.dumps(d) + "\n")
    tmp.replace(path)


# ---- python domain.py: a look at the embedded domain ----

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Show problems, routes and statistics of the embedded domain.")
    ap.add_argument("--split", default="train", choices=list(SPLITS), help="which split to show")
    ap.add_argument("--n", type=int, default=2000, help="problems to draw for the statistics")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split")
    ap.add_argument("--write", metavar="FILE", help="also write the problems as JSONL to this file")
    args = ap.parse_args()
    problems = split(args.split, args.n, args.seed)
    rng = random.Random(0)
    p = problems[0]
    print(f"question: {p.question}\nrules (teacher only): {p.rules}\n\npositive route:\n{teacher_route(p).text}\n")
    neg = negative_route(p, rng)
    print(f"negative route (first wrong step {neg.first_wrong}):\n{neg.text}\n")
    guessed = sum(teacher_route(q, guided=False).correct for q in problems) / len(problems)
    mode, count = Counter(q.answer for q in problems).most_common(1)[0]
    steps = Counter(len(q.ledger[1]) for q in problems)
    print(f"{args.split}: {len(problems)} problems; events {dict(sorted(steps.items()))}")
    print(f"teacher with the rules: 100.0 % right; without them: {100 * guessed:.1f} %")
    print(f"best constant guess ('{mode}'): {100 * count / len(problems):.1f} %")
    n_tokens = [len(tokenizer().encode(q.question + "\n" + teacher_route(q).text)) for q in problems[:200]]
    print(f"question + route: {sum(n_tokens) / len(n_tokens):.0f} tokens on average, {max(n_tokens)} at most")
    if args.write:
        save_jsonl([Problem(q.question, q.answer, q.rules, [teacher_route(q), negative_route(q, rng)])
                    for q in problems], args.write)
        print(f"wrote {args.write}")
