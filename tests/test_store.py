"""psrv.store and the optimizers' row-wise updates: a push that carries some rows changes exactly those rows, as a
dense update would; checkpoints round-trip; the BSP accumulator, clipping, L2 mask and the writer protocol."""
import numpy as np
import pytest

from psrv import optim
from psrv.store import Store

from .test_optim import CASE_IDS, CASES, HYPER, build, reference


def warmed(name, changes, shape, dtype, seed=0):
    """An optimizer and theta after a few dense steps, so that every state array is non-zero."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(shape).astype(dtype)
    opt = build(name, theta, **changes)
    for _ in range(3):
        opt.step(theta, rng.standard_normal(shape).astype(dtype), 0.05)
    return theta, opt


@pytest.mark.parametrize("name,changes", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(9,), (9, 4)], ids=["vector", "matrix"])
def test_row_update_equals_the_dense_update_on_its_rows_and_leaves_the_others_alone(name, changes, dtype, shape):
    rows = np.array([0, 3, 4, 8])
    theta_a, opt_a = warmed(name, changes, shape, dtype)
    theta_b, opt_b = warmed(name, changes, shape, dtype)
    before, state_before = theta_a.copy(), opt_a.state_dict()
    g = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    opt_a.step(theta_a, np.ascontiguousarray(g[rows]), 0.1, rows)
    opt_b.step(theta_b, g, 0.1)
    others = np.setdiff1d(np.arange(shape[0]), rows)
    np.testing.assert_array_equal(theta_a[rows], theta_b[rows])      # bit for bit, not approximately
    np.testing.assert_array_equal(theta_a[others], before[others])
    for k, a in opt_a.state_dict()["arrays"].items():
        np.testing.assert_array_equal(a[rows], opt_b.state_dict()["arrays"][k][rows])
        np.testing.assert_array_equal(a[others], state_before["arrays"][k][others])


@pytest.mark.parametrize("name,changes", CASES, ids=CASE_IDS)
def test_sparse_pushes_follow_each_rows_own_history(name, changes):
    """Every row is a separate problem: after pushes that touch random subsets, each row equals the serial
    reference run on that row alone with the gradients that touched it (Adam counts each row's own updates)."""
    rng = np.random.default_rng(4)
    n, steps = 12, 30
    theta0 = rng.standard_normal(n)
    theta = theta0.copy()
    opt = build(name, theta, **changes)
    history = {r: ([], []) for r in range(n)}
    for _ in range(steps):
        rows = np.flatnonzero(rng.random(n) < 0.4)
        g, lr = rng.standard_normal(len(rows)), float(rng.uniform(0.01, 0.2))
        opt.step(theta, g, lr, rows)
        for r, x in zip(rows, g):
            history[r][0].append(np.array([x]))
            history[r][1].append(lr)
    for r, (grads, lrs) in history.items():
        want = reference(name, {**HYPER, **changes}, theta0[r:r + 1], grads, lrs)[-1] if grads else theta0[r:r + 1]
        np.testing.assert_allclose(theta[r:r + 1], want, rtol=1e-12, err_msg=f"{name} row {r}")


def test_row_update_refuses_rows_out_of_order_or_range():
    theta = np.zeros(5)
    opt = build("adam", theta)
    for rows in ([2, 1], [1, 1], [0, 5], [-1, 2]):
        with pytest.raises(ValueError, match="rows must be increasing"):
            opt.step(theta, np.zeros(2), 0.1, np.array(rows))
    with pytest.raises(ValueError, match=r"grad is <f8 \[3\]"):
        opt.step(theta, np.zeros(3), 0.1, np.array([0, 1]))


class Writer:
    """Records the seqlock protocol the store follows."""

    def __init__(self):
        self.calls = []

    def begin_write(self):
        self.calls.append("begin")

    def end_write(self, version):
        self.calls.append(("end", version))


def store(theta=None, name="sgd", **kw):
    theta = np.zeros(4) if theta is None else theta
    return Store(theta, build(name, theta), lambda step: 0.5 / (step + 1), **kw)


def test_bsp_step_is_the_mean_of_the_pushes_at_the_steps_learning_rate():
    w = Writer()
    s = store(writer=w)
    s.push(np.array([1.0, 2, 3, 4]))
    s.push(np.array([3.0, 2, 1, 0]))
    assert s.apply_step(step=1, version=7)
    np.testing.assert_array_equal(s.theta, -0.25 * np.array([2.0, 2, 2, 2]))   # lr(1) = 0.25
    assert s.version == 7 and w.calls == ["begin", ("end", 7)]
    assert not s.apply_step(step=2, version=8) and s.version == 7              # an empty step changes nothing
    np.testing.assert_array_equal(s.acc, 0.0)


def test_keyed_bsp_step_updates_only_the_rows_pushed():
    s = store()
    s.push(np.array([2.0, 4.0]), keys=np.array([0, 2]))
    s.push(np.array([6.0]), keys=np.array([2]))
    assert s.apply_step(step=0, version=1)
    np.testing.assert_array_equal(s.theta, [-0.5 * 1.0, 0.0, -0.5 * 5.0, 0.0])  # sums over the 2 pushes / 2
    np.testing.assert_array_equal(s.acc, 0.0)


def test_immediate_update_scales_and_penalizes_only_the_masked_rows():
    theta = np.array([1.0, -2.0, 3.0])
    s = store(theta, l2=0.1, l2_mask=np.array([True, True, False]))   # the last row is an intercept
    s.update(np.array([1.0, 1.0, 1.0]), step=0, version=1, scale=0.5)
    np.testing.assert_allclose(s.theta, [1 - 0.5 * (0.5 + 0.1), -2 - 0.5 * (0.5 - 0.2), 3 - 0.5 * 0.5])
    s.update(np.array([2.0]), step=0, version=2, keys=np.array([1]))   # a keyed push: its row alone
    assert s.theta[0] == 1 - 0.5 * 0.6 and s.theta[2] == 3 - 0.25


def test_clipping_scales_a_push_down_to_the_norm_and_counts_it():
    s = store(clip_norm=1.0)
    s.update(np.array([3.0, 4.0, 0, 0]), step=0, version=1)
    np.testing.assert_allclose(s.theta, -0.5 * np.array([0.6, 0.8, 0, 0]))
    s.update(np.array([0.3, 0.4, 0, 0]), step=0, version=2)   # under the norm: untouched
    assert s.clipped == 1


def test_check_refuses_what_does_not_fit():
    s = store(np.zeros((4, 2)))
    s.check(np.zeros((4, 2)))
    s.check(np.zeros((2, 2)), keys=np.array([1, 3]))
    with pytest.raises(TypeError, match="dtype <f4 does not match"):   # the wire's bad_dtype, not bad_shape
        s.check(np.zeros((4, 2), np.float32))
    for grad, keys, match in [(np.zeros((4, 3)), None, "does not match"), (np.zeros((2, 2)), np.array([3, 1]), "increasing"),
                              (np.zeros((1, 2)), np.array([4]), "increasing"), (np.zeros((2, 2)), np.array([0.0, 1]),
                                                                                  "integers")]:
        with pytest.raises(ValueError, match=match):
            s.check(grad, keys)
    assert not s.finite(np.array([[0.0, np.inf]] * 4)) and s.finite(np.zeros((4, 2)))


def test_snapshot_is_a_copy_per_version():
    s = store()
    snap = s.snapshot()
    assert s.snapshot() is snap
    s.update(np.ones(4), step=0, version=1)
    np.testing.assert_array_equal(snap, 0.0)          # what a reply in flight holds does not change
    assert s.snapshot() is not snap and s.snapshot()[0] == -0.5


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam"])
def test_state_round_trips_and_later_updates_agree(name):
    rng = np.random.default_rng(5)
    a = store(rng.standard_normal(6), name)
    for v in range(1, 4):
        keys = np.array([1, 4]) if v == 2 else None       # one keyed push: Adam's per-row counts then differ
        a.update(rng.standard_normal(6 if keys is None else 2), step=v, version=v, keys=keys)
    meta, arrays = a.state()
    arrays = {k: v.copy() for k, v in arrays.items()}
    w = Writer()
    b = store(np.zeros(6), name, writer=w)
    b.load(meta, arrays)
    assert b.version == 3 and w.calls == ["begin", ("end", 3)]    # local workers read the restored version
    g = rng.standard_normal(6)
    a.update(g, step=4, version=4)
    b.update(g, step=4, version=4)
    np.testing.assert_array_equal(a.theta, b.theta)
    with pytest.raises(ValueError, match="this model needs"):
        store(np.zeros(5), name).load(meta, arrays)


def test_optimizers_without_row_state_keep_their_checkpoint_shape():
    theta = np.zeros((3, 2))
    assert optim.Adam(theta, beta1=0.9, beta2=0.99, eps=1e-8).state_dict()["arrays"]["t"].shape == (3,)


def test_adam_state_from_before_per_row_counts_loads_with_every_row_at_the_step_count():
    theta = np.zeros((3, 2))
    old = {"name": "adam", "steps": 7, "arrays": {"m": np.ones((3, 2)), "v": np.ones((3, 2))}}
    opt = optim.Adam(theta, beta1=0.9, beta2=0.99, eps=1e-8)
    opt.load_state_dict(old)
    np.testing.assert_array_equal(opt.state_dict()["arrays"]["t"], [7, 7, 7])


def test_a_grouped_step_applies_the_pushes_mean_and_takes_the_members_mean_state():
    """Group steps with Adam: each push is how far a member moved theta, with its (m, v) at the end; the step moves
    theta by the pushes' mean (no rule of its own, whatever train.optimizer is), takes the states' mean and counts
    the BSP steps the group step held (Adam's bias correction counts them)."""
    theta = np.arange(3.0)
    opt = build("adam", theta)
    s = Store(theta, opt, lambda step: 1.0, grouped=True)
    moves = [np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])]
    states = [np.array([[1.0, 1.0, 1.0], [4.0, 4.0, 4.0]]), np.array([[3.0, 3.0, 3.0], [2.0, 2.0, 2.0]])]
    for d, st in zip(moves, states):
        s.push(d, state=st)
    assert s.apply_step(0, 1, steps=5)
    np.testing.assert_array_equal(theta, np.arange(3.0) - 2.0)
    np.testing.assert_array_equal(opt.state["m"], np.full(3, 2.0))
    np.testing.assert_array_equal(opt.state["v"], np.full(3, 3.0))
    assert opt.steps == 5 and (opt.state["t"] == 5).all() and s.version == 1
    # the next step's sums start from zero
    s.push(moves[0], state=states[0])
    assert s.apply_step(1, 2, steps=2)
    np.testing.assert_array_equal(theta, np.arange(3.0) - 2.0 - moves[0])
    np.testing.assert_array_equal(opt.state["m"], states[0][0])
    assert opt.steps == 7


def test_a_grouped_plain_sgd_step_counts_the_bsp_steps_it_held():
    theta = np.zeros(3)
    opt = build("sgd", theta)
    s = Store(theta, opt, lambda step: 1.0, grouped=True)
    s.push(np.array([1.0, 2.0, 3.0]))
    s.push(np.array([3.0, 2.0, 1.0]))
    assert s.apply_step(0, 1, steps=4)
    np.testing.assert_array_equal(theta, [-2.0, -2.0, -2.0])
    assert opt.steps == 4
