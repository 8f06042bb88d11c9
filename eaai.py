"""Enabling Autonomy via Asymptotic Induction (EAAI): external routes are a crutch, so during RL the
external signal h(step) in [0, 1] decays from 1 (full signal) to 0 (the model reasons alone).

    h(t) = 1                                      t < hold
    u = (t - hold) / decay                        0 <= u < 1
    linear       h = 1 - u
    cosine       h = (1 + cos(pi u)) / 2
    exponential  h = (exp(-rate u) - exp(-rate)) / (1 - exp(-rate))    (asymptotic, then exactly 0)
    h(t) = 0                                      t >= hold + decay   (the autonomy phase)

Each prompt then gets a Hint: whether routes are shown (with probability h), how many (about h * K,
at least one when shown), and how much of each route's text (the prefix fraction h). The three fade
together, so the route text a prompt carries falls like h^3 (choice 4). Each of the three can be
switched off, and then stays at full signal until the autonomy phase.

Choices that are ours (the paper states the idea, not the curve):
1. The three shapes above, a hold at h = 1 before the decay, and an autonomy step after which h is
   exactly 0; default cosine, no hold, decay over the first 60 % of training (train.py's choice).
2. The exponential is renormalised to reach exactly 0 at the autonomy step; rate 5 by default.
3. The count is drawn by stochastic rounding of h * K (its mean is h * K).
4. Show, count and prefix all follow the same h, at once.
"""

import argparse
import math
import random
from dataclasses import dataclass

SHAPES = ("linear", "cosine", "exponential")


@dataclass
class Schedule:
    shape: str = "cosine"
    hold: int = 0  # steps at h = 1 before the decay starts
    decay: int = 100  # steps of decay; h is exactly 0 from step hold + decay on
    rate: float = 5.0  # exponential shape only

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"EAAI shape {self.shape!r} is not one of {', '.join(SHAPES)}")
        if self.hold < 0 or self.decay < 0:
            raise ValueError(f"EAAI hold and decay must be >= 0, got {self.hold} and {self.decay}")

    def h(self, step: int) -> float:
        if step < self.hold:
            return 1.0
        if step >= self.hold + self.decay:
            return 0.0
        u = (step - self.hold) / self.decay
        if self.shape == "linear":
            return 1.0 - u
        if self.shape == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * u))
        return (math.exp(-self.rate * u) - math.exp(-self.rate)) / (1.0 - math.exp(-self.rate))


@dataclass
class Hint:
    show: bool  # routes in this prompt at all
    k: int  # how many routes (0 when not shown)
    frac: float  # prefix fraction of each route's text shown


class Annealer:
    """Per-prompt decisions from h(step), with its own seeded RNG; state_dict() / load_state_dict()
    make a resumed run draw exactly what the uninterrupted run would have drawn."""

    def __init__(self, schedule: Schedule, K: int, seed: int = 0, vary_show=True, vary_count=True, vary_length=True):
        self.schedule, self.K = schedule, K
        self.vary_show, self.vary_count, self.vary_length = vary_show, vary_count, vary_length
        self.rng = random.Random(seed)

    def hint(self, step: int) -> Hint:
        h = self.schedule.h(step)
        u1, u2 = self.rng.random(), self.rng.random()  # drawn every call, so the stream never depends on h
        show = h > 0 and self.K > 0 and (u1 < h if self.vary_show else True)  # choice 4: all three follow h
        if not show:
            return Hint(False, 0, 0.0)
        k = max(1, min(self.K, math.floor(h * self.K + u2))) if self.vary_count else self.K  # choice 3
        return Hint(True, k, h if self.vary_length else 1.0)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict):
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))  # tuple again after a torch.save round trip


def plot(schedule: Schedule, steps: int, width: int = 60, rows: int = 10) -> str:
    """A small text plot of h over the steps."""
    hs = [schedule.h(round(i * (steps - 1) / (width - 1))) for i in range(width)]
    lines = []
    for r in range(rows, -1, -1):
        y = r / rows
        lines.append(f"{y:4.1f} |" + "".join("*" if round(h * rows) == r else " " for h in hs))
    lines.append("     +" + "-" * width)
    lines.append(f"      0{'step':^{width - 2 - len(str(steps - 1))}}{steps - 1}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print the EAAI schedule h(step) as a text plot, and sample hints.")
    ap.add_argument("--shape", default="cosine", choices=SHAPES, help="shape of the decay")
    ap.add_argument("--steps", type=int, default=200, help="training steps to plot")
    ap.add_argument("--hold", type=int, default=0, help="steps at h = 1 before the decay")
    ap.add_argument("--decay", type=int, default=120, help="steps of decay; h = 0 after hold + decay")
    ap.add_argument("--rate", type=float, default=5.0, help="rate of the exponential shape")
    ap.add_argument("--K", type=int, default=3, help="routes shown at full signal")
    args = ap.parse_args()
    try:
        sched = Schedule(args.shape, args.hold, args.decay, args.rate)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"EAAI {args.shape}: hold {args.hold}, decay {args.decay}, autonomy from step {args.hold + args.decay}\n")
    print(plot(sched, args.steps))
    ann = Annealer(sched, args.K, seed=0)
    print("\nper 1000 prompts:  step     h  routes shown (mean)  prefix shown (mean)")
    for t in range(0, args.steps, max(1, args.steps // 10)):
        hints = [ann.hint(t) for _ in range(1000)]
        shown = [x for x in hints if x.show]
        frac = sum(x.frac for x in shown) / len(shown) if shown else 0.0
        print(f"{'':18}{t:5d}  {sched.h(t):.2f}  {sum(x.k for x in hints) / 1000:19.2f}  {frac:19.2f}")
