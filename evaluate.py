"""Evaluation: greedy accuracy with no route and with routes shown, the verdicts, and the route-only rule in the
policy's own samples; `show` prints what the model was shown and what it wrote.

    python train.py --stage eval --init out/rl             # test and hard, appended to out/rl/eval.jsonl
    python train.py --stage eval --init out/rl --show 3    # three test problems: prompt, response, what is right

Choices that are ours:
1. Evaluation is greedy. acc_with_routes shows K routes drawn from the split's own route bank with the default
   positive / negative mix, seeded per problem, so every evaluation sees the same prompts.
2. The rule's prior (domain.rule_prior) is measured on PRIOR_SAMPLES samples of each route-only problem alone, at
   RL's temperature: what plain GRPO's exploration starts from.
"""

import random

import domain as D
import distill
import mrpv
from rollout import generate, greedy


def completions(model, tok, problems, routes, max_new_tokens):
    """The greedy completion of each problem's prompt showing `routes[i]` (empty: autonomous)."""
    prompts = [distill.encode_prompt(tok, mrpv.build_prompt(p, r)) for p, r in zip(problems, routes)]
    return [tok.decode(o) for o in greedy(model, prompts, max_new_tokens, tok.eos_ids, tok.pad_id)]


def eval_routes(banks, args):
    """The routes evaluation shows problem i: K drawn from its bank, seeded by i alone (choice 1)."""
    return [mrpv.select_routes(b, args.K, args.neg_share, random.Random(f"eval-{i}")) for i, b in enumerate(banks)]


def evaluate(model, tok, problems, banks, args):
    """acc_autonomous (no routes), acc_with_routes (K routes from the bank, seeded per problem; choice 1), each
    problem's 0 / 1 (right_*, for paired comparisons), verdict_acc (share of shown routes judged right), split by
    whether the answer with routes is right (verdict_acc_own_right / _own_wrong), and step_acc (share of shown
    wrong routes whose first wrong step is named). On the embedded domain also per part, taught and route-only
    (domain.py choice 5): n_<part>, acc_autonomous_<part>, acc_with_routes_<part>, verdict_acc_<part>."""
    shown = eval_routes(banks, args)
    routes = {"autonomous": [[]] * len(problems), "with_routes": shown}
    texts = {k: completions(model, tok, problems, r, args.max_new_tokens) for k, r in routes.items()}
    free_form = bool(args.data)  # --data: an answer without its answer line is found in the text
    right = {k: [D.check(mrpv.answer_of(t, free_form), p.answer) for t, p in zip(ts, problems)]
             for k, ts in texts.items()}
    judged = [mrpv.judged(mrpv.parse(t), r) for t, r in zip(texts["with_routes"], shown)]  # per problem, per route
    share = lambda xs: sum(xs) / len(xs) if xs else None
    verdicts = lambda keep: share([v for j, ok in zip(judged, keep) if ok for v, _ in j])
    everything = [True] * len(problems)
    out = {**{f"acc_{k}": share(r) or 0.0 for k, r in right.items()}, "verdict_acc": verdicts(everything),
           "verdict_acc_own_right": verdicts(right["with_routes"]),
           "verdict_acc_own_wrong": verdicts([not r for r in right["with_routes"]]),
           "step_acc": share([s for j in judged for _, s in j if s is not None])}
    route_only = [D.route_only(p) for p in problems]
    if None not in route_only:  # the embedded domain: taught and route-only parts
        out["route_only"] = "".join("01"[x] for x in route_only)  # each problem's part, for paired comparisons by part
        for part, keep in (("taught", [not r for r in route_only]), ("route_only", route_only)):
            out[f"n_{part}"] = sum(keep)
            out.update({f"acc_{k}_{part}": share([x for x, ok in zip(r, keep) if ok]) for k, r in right.items()})
            out[f"verdict_acc_{part}"] = verdicts(keep)
        alone = prior_samples(model, tok, [p for p, r in zip(problems, route_only) if r], args.max_new_tokens)
        out["rule_prior"], out["rule_prior_lines"] = D.rule_prior(alone)  # R5 in the student's own samples
    return {**out, **{f"right_{k}": "".join("01"[x] for x in r) for k, r in right.items()}}


PRIOR_SAMPLES, PRIOR_TEMPERATURE = 4, 0.7  # the rule's prior (choice 2): samples per route-only problem


def prior_samples(model, tok, problems, max_new_tokens, seed=0):
    """PRIOR_SAMPLES samples at PRIOR_TEMPERATURE of each problem's autonomous prompt -> [(problem, text)]: what the
    policy writes alone, from which plain GRPO's exploration starts (domain.rule_prior)."""
    prompts = [distill.encode_prompt(tok, mrpv.build_prompt(p, [])) for p in problems]
    samples = generate(model, prompts, n=PRIOR_SAMPLES, max_new_tokens=max_new_tokens, temperature=PRIOR_TEMPERATURE,
                       eos_ids=tok.eos_ids, seed=seed, pad_id=tok.pad_id) if prompts else []
    return [(problems[s.prompt_index], tok.decode(s.tokens)) for s in samples]


def show(model, tok, problems, banks, args, split):
    """--show N: the first N problems of a split, each with the routes evaluate() shows it (the same draw), the
    model's greedy response with them, and what is right: the answer, and per route its verdict and first wrong step."""
    n = min(args.show, len(problems))
    shown = eval_routes(banks[:n], args)
    texts = completions(model, tok, problems[:n], shown, args.max_new_tokens)
    verdict = lambda v: ("no verdict" if v == "missing" else "sound" if v is None else f"wrong at step {v}" if v
                         else "wrong")
    for i, (p, routes, text) in enumerate(zip(problems, shown, texts)):
        parsed, part = mrpv.parse(text), {None: "", True: ", route-only", False: ", taught"}[D.route_only(p)]
        right = D.check(mrpv.answer_of(text, bool(args.data), parsed), p.answer)
        print(f"\n=== {split} problem {i}{part}: the prompt\n{mrpv.build_prompt(p, routes)}=== the response\n{text}\n"
              f"=== what is right\nanswer {p.answer}: it says {parsed.answer} ({'right' if right else 'wrong'})")
        for k, (r, (ok, step_ok)) in enumerate(zip(routes, mrpv.judged(parsed, routes)), 1):
            truth = "sound" if r.correct else verdict(r.first_wrong or 0)
            said = verdict(parsed.verdicts.get(k, "missing"))
            step = "" if step_ok is None or not ok else f", the step {'right' if step_ok else 'wrong'}"
            print(f"route {k}: {truth}; it says {said} (verdict {'right' if ok else 'wrong'}{step})")


def before_after(first: dict, last: dict):
    """The run's last lines: accuracy alone (route-only problems alone, where a split has them) at its start and
    at its end, per split."""
    for split, a in last.items():
        key = "acc_autonomous_route_only" if a.get("n_route_only") else "acc_autonomous"
        was = f"{first[split][key]:.1%} -> " if split in first and first[split].get(key) is not None else ""
        which = "route-only problems" if a.get("n_route_only") else "all problems"
        print(f"rl: {split}, {which} alone: {was}{a[key]:.1%} (with routes "
              f"{a[key.replace('autonomous', 'with_routes')]:.1%})")
