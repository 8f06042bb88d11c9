"""Multi-Route Process Verification (MRPV): the policy reads the question and K external reasoning
routes, some right and some wrong, says of each whether its process is sound and where it first
goes wrong, then reasons itself and answers. It is rewarded for the answer AND for its verdicts, so
it learns from wrong routes too (rejection-sampling fine-tuning would throw them away).

Prompt, K = 2 routes shown (route order shuffled by `select_routes`, with a seed): the routes come
first, each under a header that names where it ends, and the question last (choice 5):

    Route 1 : 10
    restock B : 5 + 5 = 10 -> B = 10
    sell B 9 : 9 > 10 no sale -> B = 10
    Answer : 10
    Route 2 : 1
    restock B : 5 + 5 = 10 -> B = 10
    sell B 9 : 10 - 9 = 1 -> B = 1
    Answer : 1
    Stock : A = 3 , B = 5 . Events : restock B ; sell B 9 . How many B ?

Response, solve-then-verify (the default, choice 5): the model's own steps and answer, then one
verdict line per shown route, in order. A verdict line restates what it compares (choice 7): the
route's result, its relation to the model's own (<, = or >), then "sound", or "wrong at step k"
naming the route's first line that disagrees with a sound chain:

    restock B : 5 + 5 = 10 -> B = 10
    sell B 9 : 10 - 9 = 1 -> B = 1
    Answer : 1
    Route 1 : 10 > 1 -> wrong at step 2
    Route 2 : 1 = 1 -> sound

Verify-then-solve (order "verify-solve", ORDERS) puts the same verdict lines first, before any reasoning.

With no route shown, the prompt is exactly the autonomous prompt ("<question>\\n") and the response
is the steps and the answer alone: one policy serves both modes.

Choices that are ours (the paper does not fix them):
1. Rewards, each in [0, 1]: answer (the checker of domain.py), verdict (share of shown routes judged
   right: sound or wrong), step (share of shown wrong routes whose first wrong step is named exactly:
   the "process" part), format (1 when the layout above is kept exactly). The total is their weighted
   mean over the parts that apply: with no route shown only answer and format count; step counts
   only when a wrong route with a known first wrong step is shown. Default weights 1, 0.5, 0.5, 0.1.
2. A route shown only in part (EAAI) is judged on what is shown: it is wrong only if its first wrong
   step is among the shown lines, so a wrong route cut before its error is sound, and under EAAI's prompts
   "always sound" earns more than the half that chance gives (tests/test_mrpv.py). Routes whose first wrong
   step is unknown are always shown whole.
3. The first answer line counts and the first verdict for a route counts; any repeat breaks the
   format (reward 0 for format), so hedging with several answers never pays.
4. The number of wrong routes among k shown is Binomial(k, neg_share), so all-wrong and all-right
   sets both occur and following the majority is not a winning strategy.
5. The layout: the question after the routes, so that the model's own steps start right after the
   question as they do with no route shown; each route with its answer line (one cut by EAAI without it,
   choice 2); the response solve-then-verify ("solve-verify", the default) or verify-then-solve
   ("verify-solve"). The question's place and the default order were chosen on dev over three seeds, for
   the distilled student's accuracy with routes (RESULTS.md, "A cold start that reads routes").
6. Consistency (Weights.consistent; train.py's default, --consistent, chosen on dev with grpo.py's
   per-component advantages, RESULTS.md): a verdict on a route whose answer line is shown earns credit
   (verdict and step) only when it agrees with the model's own answer: "sound" when the route reaches
   the same answer, "wrong" when it does not. A verdict that is right about the route but contradicts
   the model's own answer earns nothing. Off in Weights(), so that evaluation's verdict_acc is plain.
7. Restated verdicts. Each route's header names where it ends ("Route 2 : 1": its answer, or the count
   after its last shown line), and each verdict line restates the comparison before judging: the route's
   result, "<", "=" or ">", the model's own result at the same depth (its answer when the route is shown
   whole, else its count after as many lines as the route shows; "vs" between texts that are not
   numbers). A tiny student did not learn bare verdicts ("Route 1 : wrong at step 2") from MRPV examples
   alone; with the restatement a verdict is two local steps, find the route's result by its label and
   compare it with the answer just written (RESULTS.md, "Routes that carry a rule the start lacks").
   The verdict reward reads only the verdict, so a wrong restatement costs nothing by itself (and a bare
   verdict line is judged as well).
"""

import math
import random
import re
from dataclasses import dataclass

from domain import Problem, Route, check, extract_answer, normalize

VERDICT = re.compile(r"Route (\d{1,4}) : (?:\S+ (?:<|=|>|vs) \S+ -> )?(sound|wrong(?: at step (\d{1,4}))?)")
ANSWER = re.compile(r"answer\s*:\s*(.*)", re.IGNORECASE)


# ---- routes shown and the prompt ----

def select_routes(bank: list[Route], k: int, neg_share: float, rng: random.Random) -> list[Route]:
    """Draw k routes from a problem's bank, about neg_share of them wrong (choice 4), in shuffled order.
    Fewer than k when the bank runs short."""
    pos = [r for r in bank if r.correct]
    neg = [r for r in bank if not r.correct]
    n_neg = min(sum(rng.random() < neg_share for _ in range(k)), len(neg))
    n_pos = min(k - n_neg, len(pos))
    n_neg = min(k - n_pos, len(neg))  # top up with wrong routes where right ones run short
    chosen = rng.sample(neg, n_neg) + rng.sample(pos, n_pos)
    rng.shuffle(chosen)
    return chosen


def step_lines(text: str) -> list[str]:
    """A route's lines without its answer line."""
    return [x for x in text.split("\n") if not ANSWER.fullmatch(x.strip())]


def show(route: Route, frac: float) -> Route:
    """The part of a route that is shown: the first ceil(frac * steps) step lines (at least one), the answer
    line only when the whole route is shown; labelled by what is shown (choice 2)."""
    steps = step_lines(route.text)
    m = max(1, math.ceil(frac * len(steps)))
    if frac >= 1 or m >= len(steps) or (not route.correct and route.first_wrong is None):
        return route
    wrong_shown = route.first_wrong is not None and route.first_wrong <= m
    return Route("\n".join(steps[:m]), not wrong_shown, route.first_wrong if wrong_shown else None)


ORDERS = ("solve-verify", "verify-solve")  # the response: own steps and answer, then verdicts; or verdicts first


def valid_order(order: str) -> str:
    """order, if it is one of ORDERS (choice 5); else a ValueError that names them."""
    if order not in ORDERS:
        raise ValueError(f"MRPV order {order!r} is not one of {', '.join(ORDERS)}")
    return order


def build_prompt(problem: Problem, routes: list[Route]) -> str:
    """Each shown route under a header that names where it ends ("Route 2 : 8", choice 7), then the question
    (choice 5). No routes: the autonomous prompt."""
    shown = "".join(f"Route {k} : {result(r.text)}\n{r.text}\n" for k, r in enumerate(routes, 1))
    return shown + problem.question + "\n"


def result(text: str) -> str:
    """Where a text ends up: its answer line's answer, else its last number (domain.extract_answer); "-" if none.
    One word: spaces inside an answer become "_", so that a verdict line parses whatever the answer."""
    return "_".join((extract_answer(text) or "-").split())


def relation(theirs: str, mine: str) -> str:
    """"=" when two results check equal, else "<" or ">" between numbers, "vs" between other texts (choice 7)."""
    if check(theirs, mine):
        return "="
    try:
        return "<" if float(normalize(theirs)) < float(normalize(mine)) else ">"
    except ValueError:
        return "vs"


def restated(route: Route, solution: str) -> str:
    """What a verdict compares (choice 7): the route's result as its header shows it against the solution's at
    the same depth: the answer when the route's answer line is shown, else the count after as many step lines."""
    theirs = result(route.text)
    depth = None if parse(route.text).answer is not None else len(step_lines(route.text))
    mine = result(solution if depth is None else "\n".join(step_lines(solution)[:depth]))
    return f"{theirs} {relation(theirs, mine)} {mine}"


def verdict_line(k: int, route: Route, solution: str | None = None) -> str:
    """Route k's verdict; given the solution, it first restates what it compares (choice 7)."""
    said = "sound" if route.correct else f"wrong at step {route.first_wrong}" if route.first_wrong else "wrong"
    return f"Route {k} : {'' if solution is None else restated(route, solution) + ' -> '}{said}"


def teacher_response(routes: list[Route], solution: str, order: str = "solve-verify") -> str:
    """The response a teacher that knows each route's label writes: its own solution (step lines and the
    answer line), then the restated verdicts (solve-verify, the default); verify-solve: the verdicts first."""
    verdicts = "".join(verdict_line(k, r, solution) + "\n" for k, r in enumerate(routes, 1))
    if valid_order(order) == "solve-verify" and routes:
        return solution + "\n" + verdicts.rstrip("\n")
    return verdicts + solution


# ---- parsing a completion ----

@dataclass
class Parsed:
    verdicts: dict  # route number -> None ("sound") or the step named as first wrong (0: "wrong", no step)
    answer: str | None  # None: no answer line
    layout: str  # one letter a line: V verdict, S step, A answer, E empty
    verdict_order: list  # route numbers of the verdict lines, in order


def parse(completion) -> Parsed:
    """Verdicts and answer of a completion. Never raises: garbage gives no verdicts and no answer."""
    text = completion if isinstance(completion, str) else ""
    verdicts, answer, layout, order = {}, None, [], []
    for line in text.strip().split("\n"):
        line = line.strip()
        if m := VERDICT.fullmatch(line):
            k = int(m.group(1))
            verdicts.setdefault(k, None if m.group(2) == "sound" else int(m.group(3) or 0))
            layout.append("V")
            order.append(k)
        elif m := ANSWER.fullmatch(line):
            if answer is None and m.group(1).strip():
                answer = m.group(1).strip()
            layout.append("A")
        else:
            layout.append("S" if line else "E")
    return Parsed(verdicts, answer, "".join(layout), order)


def on_verdict_lines(pieces: list[str]) -> list[bool]:
    """pieces: the decoded text of each token of a completion -> whether each token starts on a verdict line
    (grpo.token_advantages). A token that holds a newline belongs to the line it ends."""
    lines = "".join(pieces).split("\n")
    is_verdict = [VERDICT.fullmatch(x.strip()) is not None for x in lines]
    out, line = [], 0
    for piece in pieces:
        out.append(is_verdict[line])
        line += piece.count("\n")
    return out


def answer_of(completion, free_form=False, parsed=None):
    """The completion's answer: its answer line; with free_form, else what domain.extract_answer finds."""
    a = (parsed or parse(completion)).answer
    return extract_answer(completion) if a is None and free_form else a


def judged(p: Parsed, routes: list[Route]) -> list[tuple[bool, bool | None]]:
    """Per shown route: whether its verdict is right (sound or wrong), and, for a wrong route whose first
    wrong step is known, whether the verdict names that step (None for the other routes)."""
    said = [p.verdicts.get(k, "missing") for k in range(1, len(routes) + 1)]
    return [(s != "missing" and (s is None) == r.correct,
             s == r.first_wrong if not r.correct and r.first_wrong else None)
            for s, r in zip(said, routes)]


# ---- rewards ----

@dataclass
class Weights:
    answer: float = 1.0
    verdict: float = 0.5
    step: float = 0.5  # 0 turns the process part (first-wrong-step localisation) off
    format: float = 0.1
    consistent: bool = False  # choice 6: verdict credit only when the verdict agrees with the model's own answer


PARTS = ("answer", "verdict", "step", "format")  # the components of a Reward, weighted by Weights


@dataclass
class Reward:
    answer: float
    verdict: float | None  # None: no route shown
    step: float | None  # None: no wrong route with a known first wrong step shown, or switched off
    format: float
    total: float


def reward(completion: str, problem: Problem, routes: list[Route], w: Weights = Weights(), free_form: bool = False,
           order: str = "solve-verify") -> Reward:
    """Rewards of one completion for a prompt that showed `routes` (as shown, see `show`), its response laid
    out in `order` (ORDERS). free_form (real data, e.g. GSM8K): without an answer line, domain.extract_answer
    finds the answer (\\boxed{}, ####, the last number); the format reward still asks for the answer line."""
    valid_order(order)
    p = parse(completion)
    K = len(routes)
    mine = answer_of(completion, free_form, p)
    answer = float(check(mine, problem.answer))
    verdict = step = None
    if K:
        said = [p.verdicts.get(k, "missing") for k in range(1, K + 1)]
        marks = judged(p, routes)
        ok = [right for right, _ in marks]
        if w.consistent:  # choice 6: "sound" only for a route reaching the model's own answer, "wrong" otherwise
            theirs = [parse(r.text).answer for r in routes]
            ok = [o and (a is None or (mine is not None and (s is None) == check(a, mine)))
                  for o, s, a in zip(ok, said, theirs)]
        verdict = sum(ok) / K
        located = [named and o for (_, named), o in zip(marks, ok) if named is not None]
        if located and w.step > 0:
            step = sum(located) / len(located)
    one_each = p.verdict_order == list(range(1, K + 1))
    shape = f"S+AV{{{K}}}" if order == "solve-verify" and K else f"V{{{K}}}S+A"
    fmt = float(one_each and re.fullmatch(shape, p.layout) is not None and p.answer is not None)
    parts = [(w.answer, answer), (w.verdict, verdict), (w.step, step), (w.format, fmt)]
    parts = [(wi, ri) for wi, ri in parts if ri is not None and wi > 0]
    total = sum(wi * ri for wi, ri in parts) / sum(wi for wi, _ in parts) if parts else 0.0
    return Reward(answer, verdict, step, fmt, total)
