"""The teacher side of ReaLM: guided chain-of-thought distillation and the route bank.

A teacher that is TOLD the domain's expert rules writes chains of thought (routes); the student is
fine-tuned on them WITHOUT the rules in its prompt, so the rules end up in its weights. Routes whose
answer checks are positives, the others negatives; per problem up to R of each form the route bank
that MRPV shows during RL. The teacher is the programmatic one of the embedded domain, or any
checkpoint that load_model accepts, sampled with rollout.generate:

    python distill.py --teacher DIR --data train.jsonl --out routes.jsonl

SFT examples: the autonomous prompt -> a positive route; and, for a share of each batch (train.py,
choice 2), an MRPV prompt showing K whole routes from the bank -> the teacher's MRPV response (its own route
and the restated verdicts, in the order asked: mrpv.ORDERS).

Choices that are ours:
1. The embedded teacher is deterministic, so a problem's R positive routes are R copies of one route
   (what R calls to it would return); its R negatives are distinct.
2. A checkpoint teacher is prompted "Rules : <rules>\\n<question>\\n" when guided and with the
   question alone when not; its routes are whatever it writes up to its end token.
3. The SFT loss is the mean cross-entropy over all response tokens of the batch (a token mean, so
   long responses weigh more than short ones); prompt and padding tokens carry no loss.
4. Verdict drills (verdict_drills; train.py --drills per batch): short examples of the restated verdict
   lines alone (mrpv.py choice 7), route headers and an own answer in the prompt, added to every SFT batch
   from the first step. They teach the comparison ("8 < 13 -> wrong") on examples that cost a tenth of an
   MRPV example; alone they do not teach verdicts in MRPV responses, beside MRPV examples they make the
   lookup of a route's result by its label come sooner (RESULTS.md, "Routes that carry a rule the start
   lacks", and "A start that has learned"). A drill names no step: the token after "wrong" carries no loss.
5. Reading drills (reading_set; train.py --reading, a share of the MRPV examples): problems whose answer
   needs the routes read, because an event to the asked item adds what only the routes say, in a world
   drawn afresh per problem. A tiny student copies an amount off a route only where it has copied that
   same amount before (the copy is learned value by value), so a drill of the route-only rule's own event
   that never adds R5's amount cannot teach R5 to be read. The drills are therefore of two kinds: half
   deliver (train.py --order-drills), adding one of domain.DELIVER_AMOUNTS (4 to 12, never R5's 1), half
   order, an event kind of the drills alone, adding one of domain.ORDER_AMOUNTS (1 to 12, R5's among
   them); the copy learned on orders carries over to deliveries. So no drill writes R5 where it applies,
   but the student learns to copy R5's amount, and some of it leaks into what it writes for a delivery on
   its own (train.py measures it: rule_prior on every evaluation line). --rule-drills puts R5's own world
   in a share of the delivery drills. RESULTS.md, "A start that has learned", has what each variant did.
"""

import argparse
import random
from dataclasses import replace

import torch
import torch.nn.functional as F

import domain as D
import model as M
import mrpv
from grpo import micro_batches
from rollout import generate
from tokenizer import load_tokenizer


# ---- the route bank ----

def embedded_bank(problem: D.Problem, R: int, rng: random.Random, guided: bool = True) -> list[D.Route]:
    """Routes of the embedded teacher for one problem: R positives (copies, choice 1) and R negatives, right and
    wrong as the problem's world says. Unguided, the one route the rule-less teacher writes, labelled by its
    answer."""
    if not guided:
        return [D.teacher_route(problem, guided=False)]
    negatives = []
    for _ in range(10 * R):
        neg = D.negative_route(problem, rng)
        if neg.text not in {r.text for r in negatives}:
            negatives.append(neg)
        if len(negatives) == R:
            break
    return [D.teacher_route(problem)] * R + negatives


def embedded_set(split: str, n: int, R: int, seed: int = 0, bank_seed: int = 0, guided: bool = True,
                 route_rule: str = "deliver"):
    """n problems of the embedded domain's split and the embedded teacher's route bank for each."""
    problems = D.split(split, n, seed, route_rule)
    rng = random.Random(f"routes-{bank_seed}")
    return problems, [embedded_bank(p, R, rng, guided) for p in problems]


def reading_set(n: int, R: int, seed: int = 0, route_rule: str = "deliver", rule_share: float = 0.0,
                order_share: float = 0.0):
    """n reading drills (choice 5): ledgers that deliver to the asked item, each in a world whose amount only its
    routes tell. With probability order_share an order drill: the deliveries become orders, adding an amount drawn
    from domain.ORDER_AMOUNTS; else a delivery drill: route_rule's own amount with probability rule_share, else one
    of domain.DELIVER_AMOUNTS (never route_rule's). With that world's answer and route bank."""
    rng = random.Random(f"reading-{seed}")
    rule = D.expert(route_rule).deliver
    others = [x for x in D.DELIVER_AMOUNTS if x != rule]
    problems, banks = [], []
    ledgers = [p.ledger for p in D.split("reading", 2 * n, seed, route_rule) if D.route_only(p)][:n]
    for stock, events, asked in ledgers:
        if rng.random() < order_share:
            events = [("order" if kind == "deliver" else kind, x, m) for kind, x, m in events]
            world = replace(D.EXPERT, order=rng.choice(D.ORDER_AMOUNTS))
        else:
            world = replace(D.EXPERT, deliver=rule if rng.random() < rule_share else rng.choice(others))
        problems.append(D.problem_of((stock, events, asked), route_rule, world))
        banks.append(embedded_bank(problems[-1], R, rng))
    return problems, banks


def jsonl_set(path):
    """The problems of a JSONL file and the routes each carries."""
    problems = D.load_jsonl(path)
    return problems, [p.routes for p in problems]


def encode_prompt(tok, text: str) -> list[int]:
    """Prompt ids: wrapped in the checkpoint's chat format when its tokenizer has one (instruct
    models), plain text otherwise (base models, the embedded domain)."""
    return tok.encode(tok.chat(text), special=False) if tok.chat_format else tok.encode(text)


def teacher_prompt(problem: D.Problem, guided: bool) -> str:
    return (f"Rules : {problem.rules}\n" if guided and problem.rules else "") + mrpv.build_prompt(problem, [])


@torch.no_grad()
def checkpoint_bank(teacher, tok, problems, R: int, guided=True, n=4, max_new_tokens=256, temperature=0.8,
                    seed=0, batch_size=32) -> list[list[D.Route]]:
    """Sample n routes per problem from a teacher checkpoint; keep up to R positives and R negatives."""
    banks = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [encode_prompt(tok, teacher_prompt(p, guided)) for p in chunk]
        samples = generate(teacher, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_ids=tok.eos_ids, seed=seed + i, pad_id=tok.pad_id)
        for j, p in enumerate(chunk):
            texts = [tok.decode(s.tokens).strip() for s in samples[j * n:(j + 1) * n]]
            routes = [D.Route(t, D.check(mrpv.answer_of(t, free_form=True), p.answer)) for t in texts]
            banks.append([r for r in routes if r.correct][:R] + [r for r in routes if not r.correct][:R])
    return banks


def teacher_accuracy(banks) -> float:
    """Share of problems on which the teacher wrote at least one right route."""
    return sum(any(r.correct for r in b) for b in banks) / max(1, len(banks))


# ---- SFT examples and loss ----

def sft_examples(problems, banks, tok, mrpv_share: float, K: int, neg_share: float, rng: random.Random,
                 order: str = "solve-verify"):
    """(prompt ids, response ids) pairs: autonomous prompt -> a positive route; with probability
    mrpv_share an MRPV prompt (K whole routes from the bank) -> the teacher's MRPV response instead, its
    verdicts after the own route or before it as `order` says (mrpv.ORDERS).
    Problems whose bank holds no positive route give no example."""
    out = []
    for p, bank in zip(problems, banks):
        positives = [r for r in bank if r.correct]
        if not positives:
            continue
        solution = rng.choice(positives).text
        shown = []
        if rng.random() < mrpv_share:
            shown = mrpv.select_routes(bank, K, neg_share, rng)
        prompt = mrpv.build_prompt(p, shown)
        response = mrpv.teacher_response(shown, solution, order)
        out.append((encode_prompt(tok, prompt), tok.encode(response) + tok.eos_ids[:1]))
    return out


def draw_batch(alone, routed, share, size, rng: random.Random):
    """An SFT batch: `size` examples drawn with replacement, each from `routed` (MRPV prompts) with
    probability `share`, else from `alone` (train.py's schedule: share 0 over the first steps). Item i of
    both lists is the same problem's example, one way and the other (or, in `routed`, a reading drill)."""
    assert len(routed) == len(alone), f"{len(routed)} MRPV examples for {len(alone)} examples alone"
    return [(routed if share and rng.random() < share else alone)[rng.randrange(len(alone))] for _ in range(size)]


def verdict_drills(n: int, K: int, rng: random.Random, tok, top: int = D.MAX_ANSWER):
    """n verdict drills (choice 4): a prompt of 1..K route headers ("Route 2 : 8", mrpv.py choice 7) and an own
    answer line, and the verdict lines that compare them ("Route 2 : 8 < 13 -> wrong"); each route's result is the
    own answer with probability 1/2, else another number of 0..top. A drill is (prompt ids, response ids, the
    response positions that carry no loss): the token after "wrong", where an MRPV response names the step."""
    out = []
    for _ in range(n):
        k, own = rng.randint(1, K), rng.randint(0, top)
        results = [own if rng.random() < 0.5 else rng.choice([x for x in range(top + 1) if x != own]) for _ in range(k)]
        prompt = "".join(f"Route {j} : {x}\n" for j, x in enumerate(results, 1)) + f"Answer : {own}\n"
        response, skip = [], set()
        for j, x in enumerate(results, 1):  # a route that is only its answer line, judged as MRPV responses judge
            route = D.Route(f"Answer : {x}", x == own)
            response += tok.encode(("\n" if j > 1 else "") + mrpv.verdict_line(j, route, f"Answer : {own}"))
            if not route.correct:
                skip.add(len(response))  # the next token ("\n" or the end): an MRPV response goes on "at step s"
        out.append((encode_prompt(tok, prompt), response + tok.eos_ids[:1], skip))
    return out


def sft_batch(examples, pad_id, device):
    """Right-padded tokens (B, T) and targets (B, T): the next token on response positions, -100 elsewhere (and on
    the response positions an example lists as carrying no loss: a drill's third element)."""
    T = max(len(e[0]) + len(e[1]) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (p, r, *skip) in enumerate(examples):
        seq = p + r
        x[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        y[i, len(p) - 1:len(seq) - 1] = torch.tensor(r)  # position t predicts token t + 1
        for j in (skip[0] if skip else ()):
            y[i, len(p) - 1 + j] = -100
    return x.to(device), y.to(device)


def sft_step(model, batch, pad_id, micro_tokens, autocast):
    """Forward and backward of one SFT batch in micro-batches of at most micro_tokens padded tokens (gradient
    accumulation; micro_batches from grpo.py); the loss is the mean over the whole batch's response tokens."""
    n_tokens = sum(len(e[1]) - len(e[2] if len(e) > 2 else ()) for e in batch)
    loss_sum = 0.0
    for micro in micro_batches(batch, micro_tokens):
        x, y = sft_batch(micro, pad_id, model.lm_head.weight.device)
        with autocast:
            loss = sft_loss(model, x, y, n_tokens)
        loss.backward()
        loss_sum += loss.item()
    return loss_sum


def sft_loss(model, x, y, n_tokens=None):
    """Cross-entropy summed over response tokens, divided by n_tokens: the response tokens of the
    whole batch when it is split into micro-batches (default: those of this one)."""
    keep = y != -100  # response positions; -100 marks prompt and padding positions: they add nothing (choice 3)
    logits = model(x, keep=keep)  # (K, V); right padding needs no mask: causal attention never looks ahead
    loss = F.cross_entropy(logits.float(), y[keep], reduction="sum")
    return loss / (n_tokens or int(keep.sum()))


# ---- python distill.py --teacher DIR --data FILE --out FILE ----

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write a route bank: a teacher checkpoint's routes for each problem, "
                                             "positives and negatives by answer check.")
    ap.add_argument("--teacher", help="teacher checkpoint folder (default: the embedded domain's programmatic teacher)")
    ap.add_argument("--data", help="JSONL problems (default: the embedded domain's train split)")
    ap.add_argument("--n-problems", type=int, default=3000, help="embedded domain: problems to write routes for")
    ap.add_argument("--out", default="out/routes.jsonl", help="route bank JSONL to write")
    ap.add_argument("--R", type=int, default=3, help="positive and negative routes kept per problem, each")
    ap.add_argument("--n", type=int, default=8, help="checkpoint teacher: routes sampled per problem")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="checkpoint teacher: tokens per route at most")
    ap.add_argument("--temperature", type=float, default=0.8, help="checkpoint teacher: sampling temperature")
    ap.add_argument("--seed", type=int, default=0, help="seed")
    args = ap.parse_args()
    try:
        problems = D.load_jsonl(args.data) if args.data else D.split("train", args.n_problems, args.seed)
        rng = random.Random(args.seed)
        if args.teacher:
            teacher, tok = M.load_model(args.teacher), load_tokenizer(args.teacher)
            print(f"sampling {args.n} routes per problem for {len(problems)} problems from {args.teacher}")
            banks = checkpoint_bank(teacher, tok, problems, args.R, True, args.n, args.max_new_tokens, args.temperature,
                                    args.seed)
            blind = checkpoint_bank(teacher, tok, problems, args.R, False, args.n, args.max_new_tokens,
                                    args.temperature, args.seed)
        elif args.data:
            raise SystemExit("error: --data without --teacher: the embedded teacher only knows the embedded domain")
        else:
            banks = [embedded_bank(p, args.R, rng) for p in problems]
            blind = [[D.teacher_route(p, guided=False)] for p in problems]
    except (D.DataError, M.CheckpointError) as e:
        raise SystemExit(f"error: {e}")
    print(f"teacher accuracy with the rules {100 * teacher_accuracy(banks):.1f} %, "
          f"without them {100 * teacher_accuracy(blind):.1f} %: what guidance buys")
    D.save_jsonl([D.Problem(p.question, p.answer, p.rules, b) for p, b in zip(problems, banks)], args.out)
    print(f"wrote {len(problems)} problems with their routes to {args.out}")
