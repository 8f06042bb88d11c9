import pickle

import pytest
import torch

import eaai as E


@pytest.mark.parametrize("shape", E.SHAPES)
def test_schedule_starts_at_one_never_rises_and_ends_at_zero(shape):
    s = E.Schedule(shape, hold=5, decay=50)
    hs = [s.h(t) for t in range(80)]  # exact below: the hold and the end return the constants 1.0 and 0.0
    assert hs[:6] == [1.0] * 6 and all(0.0 <= h <= 1.0 for h in hs)
    assert all(a >= b for a, b in zip(hs, hs[1:]))
    assert hs[55:] == [0.0] * 25 and hs[54] > 0.0
    assert E.Schedule(shape, decay=0).h(0) == 0.0


def test_shapes_differ_where_they_should():
    lin, cos, exp = (E.Schedule(s, decay=100).h(25) for s in E.SHAPES)
    assert lin == 0.75 and cos > lin > exp  # exact: 1 - 25 / 100 has no rounding in binary


@pytest.mark.parametrize("shape, at_quarter, at_half, at_three_quarters", [
    ("linear", 0.75, 0.5, 0.25),
    ("cosine", (2 + 2 ** 0.5) / 4, 0.5, (2 - 2 ** 0.5) / 4),  # (1 + cos(pi u)) / 2 at u = 1/4, 1/2, 3/4
    ("exponential", 0.281665, 0.075858, 0.016894),  # (e^(-5u) - e^-5) / (1 - e^-5), to 6 places
])
def test_each_shape_by_its_values(shape, at_quarter, at_half, at_three_quarters):
    """Each shape pinned at u = 1/4, 1/2, 3/4 after a hold of 10 (a square root or a power of the cosine,
    another rate, or a decay measured from step 0 fails here)."""
    s = E.Schedule(shape, hold=10, decay=40)
    got = [s.h(t) for t in (10, 20, 30, 40, 50)]
    assert got[0] == 1.0 and got[4] == 0.0
    assert got[1:4] == pytest.approx([at_quarter, at_half, at_three_quarters], abs=1e-6)


def test_hints_follow_h():
    ann = E.Annealer(E.Schedule("linear", decay=100), K=4, seed=0)
    full = [ann.hint(0) for _ in range(200)]
    assert all(h.show and h.k == 4 and h.frac == 1.0 for h in full)
    half = [ann.hint(50) for _ in range(4000)]
    shown = [h for h in half if h.show]
    assert abs(len(shown) / 4000 - 0.5) < 0.03 and all(1 <= h.k <= 4 and h.frac == 0.5 for h in shown)
    assert abs(sum(h.k for h in shown) / len(shown) - 2.0) < 0.1
    assert all(not ann.hint(100).show for _ in range(100))
    fixed = E.Annealer(E.Schedule("linear", decay=100), K=4, vary_show=False, vary_count=False, vary_length=False)
    assert all(fixed.hint(50) == E.Hint(True, 4, 1.0) for _ in range(50)) and not fixed.hint(100).show


def test_save_and_restore_continue_identically(tmp_path):
    a = E.Annealer(E.Schedule("cosine", decay=60), K=3, seed=7)
    for t in range(20):
        a.hint(t)
    torch.save({"eaai": a.state_dict()}, tmp_path / "state.pt")
    rest = [a.hint(t) for t in range(20, 60)]
    b = E.Annealer(E.Schedule("cosine", decay=60), K=3, seed=999)
    b.load_state_dict(torch.load(tmp_path / "state.pt")["eaai"])
    assert [b.hint(t) for t in range(20, 60)] == rest
    c = E.Annealer(E.Schedule("cosine", decay=60), K=3, seed=1)
    c.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    assert c.hint(3) == a.hint(3)


def test_bad_schedules():
    with pytest.raises(ValueError, match="shape"):
        E.Schedule("step")
    with pytest.raises(ValueError, match=">= 0"):
        E.Schedule(decay=-1)

