"""Group steps' shared segment (psrv/group.py): the members' barrier and mean, in one process with threads (the
whole run against the serial oracle is tests/test_e2e.py::test_group_steps_equal_serial_bsp_of_the_sub_steps)."""
import sys
import threading

import numpy as np
import pytest

from psrv import blocks
from psrv.group import WRITING, Group, Member, Stale


@pytest.fixture
def segment():
    g = Group.create(blocks.run_prefix() + "grouptest", 3, (4,), np.float64)
    yield g
    g.close()


@pytest.fixture(autouse=True)
def fast_switch():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)   # threads that poll share one interpreter lock: hand it over often
    yield
    sys.setswitchinterval(old)


def grad_of(member: int, k: int) -> np.ndarray:
    return np.arange(4.0) * (member + 1) + 10.0 * k


def run_members(segment, plan: dict, k_steps: int, lr: float, timeout_s: float = 30.0, clock: int = 0,
                l2: float = 0.0, l2_rows: int = 0) -> dict:
    """Each worker in `plan` (wid -> sub-steps with rows) on a thread of its own: sub-step k's gradient is
    grad_of(wid, k) + its theta (so that it depends on the step's iterate). A member whose rows end early follows
    the remaining sub-steps without rows, as workers/worker.py does. Returns wid -> (theta, member)."""
    members, out = sorted(plan), {}

    def work(wid):
        m = Member(Attached(segment), wid, timeout_s, l2=l2, l2_rows=l2_rows)
        m.begin(clock, k_steps, plan[wid], members)
        theta = np.ones(4)
        for k in range(plan[wid]):
            np.add(grad_of(wid, k), theta, out=m.grad(k))
            m.step(k, theta, lr)
        k = plan[wid]
        while k < k_steps and m.step(k, theta, lr, rows=False):
            k += 1
        m.group.close()
        out[wid] = (theta, m)

    threads = [threading.Thread(target=work, args=(w,)) for w in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def Attached(segment):
    return Group.attach(segment.name, segment.members, segment.shape, segment.dtype)


def serial(plan: dict, k_steps: int, lr: float, n: int) -> np.ndarray:
    theta = np.ones(4)
    for k in range(k_steps):
        s = sum(grad_of(w, k) + theta for w in sorted(plan) if k < plan[w])
        if isinstance(s, np.ndarray):
            theta = theta - lr / n * s
    return theta


def test_members_apply_the_same_mean_bit_for_bit(segment):
    plan = {0: 5, 1: 5, 2: 5}
    out = run_members(segment, plan, 5, 0.1)
    thetas = [out[w][0] for w in plan]
    assert all(np.array_equal(thetas[0], t) for t in thetas)
    np.testing.assert_allclose(thetas[0], serial(plan, 5, 0.1, 3), rtol=1e-13)


def test_a_member_whose_rows_end_early_adds_nothing_after_but_follows_to_the_same_theta(segment):
    """Its push is how far theta moved (workers/worker.py), so it must end where the others end."""
    plan = {0: 4, 1: 2, 2: 4}            # worker 1's batch ended at its epoch's end, after 2 of 4 sub-steps
    out = run_members(segment, plan, 4, 0.05, timeout_s=30.0)
    np.testing.assert_allclose(out[0][0], serial(plan, 4, 0.05, 3), rtol=1e-13)
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][0], out[2][0])
    assert not any(m.left for _, m in out.values())


def test_a_subset_of_members_and_later_clocks(segment):
    plan = {0: 3, 2: 3}                  # worker 1 is not in this step (dead, or finished)
    for clock in (0, 1, 7):              # counts go on growing over the run
        out = run_members(segment, plan, 3, 0.1, clock=clock)
        np.testing.assert_allclose(out[0][0], serial(plan, 3, 0.1, 2), rtol=1e-13)


def test_a_member_that_never_publishes_is_left_behind_after_the_timeout(segment):
    """Worker 2 is in the step but never comes: the others leave the group at the first sub-step, after
    timeout_s, and take their sub-steps alone (plain SGD on their own gradients)."""
    m0, lr = Member(Attached(segment), 0, 0.05), 0.1
    m0.begin(0, 3, 3, [0, 2])
    theta = np.ones(4)
    expected = theta.copy()
    for k in range(3):
        np.add(grad_of(0, k), theta, out=m0.grad(k))
        expected -= lr * (grad_of(0, k) + expected)
        m0.step(k, theta, lr)
    assert m0.left and m0.waited_s >= 0.05
    np.testing.assert_allclose(theta, expected, rtol=1e-13)
    # it says so in its count, so that worker 2, arriving late, does not wait for it either
    late = Member(Attached(segment), 2, 5.0)
    late.begin(0, 3, 3, [0, 2])
    theta2 = np.ones(4)
    np.add(grad_of(2, 0), theta2, out=late.grad(0))
    late.step(0, theta2, lr)
    assert not late.left
    np.testing.assert_allclose(theta2, 1 - lr / 2 * (grad_of(2, 0) + 1), rtol=1e-13)
    m0.group.close()
    late.group.close()


def test_a_follower_whose_peer_stops_coming_leaves_after_the_timeout_and_ends_its_step():
    """Worker 1 (rows for one sub-step) follows the others; worker 0 stops after its first sub-step (a member
    died). The follower waits timeout_s at sub-step 1, leaves, and its following ends there, its theta as the
    sub-steps it applied left it: no wait without an end."""
    seg = Group.create(blocks.run_prefix() + "groupleave", 2, (4,), np.float64)
    try:
        lr, l2 = 0.1, 0.5
        dead = Member(Attached(seg), 0, 30.0, l2=l2, l2_rows=3)
        dead.begin(0, 3, 3, [0, 1])
        follower = Member(Attached(seg), 1, 0.05, l2=l2, l2_rows=3)
        follower.begin(0, 3, 1, [0, 1])
        theta0, theta1 = np.ones(4), np.ones(4)
        done = threading.Event()

        def first_sub_step():   # worker 0's only sub-step, beside worker 1's
            np.add(grad_of(0, 0), theta0, out=dead.grad(0))
            dead.step(0, theta0, lr)
            done.set()

        t = threading.Thread(target=first_sub_step)
        t.start()
        np.add(grad_of(1, 0), theta1, out=follower.grad(0))
        assert follower.step(0, theta1, lr)
        t.join(30)
        assert done.is_set() and np.array_equal(theta0, theta1)
        after_first = theta1.copy()
        # sub-step 1: worker 0 never publishes it; the follower leaves after timeout_s and stops following
        assert follower.step(1, theta1, lr, rows=False) is False
        assert follower.left and follower.waited_s >= 0.05
        assert np.array_equal(theta1, after_first)
        assert follower.step(2, theta1, lr, rows=False) is False and np.array_equal(theta1, after_first)
        term = l2 * np.r_[np.ones(3), 0.0]
        np.testing.assert_allclose(after_first, 1 - lr * ((grad_of(0, 0) + grad_of(1, 0) + 2) / 2 + term),
                                   rtol=1e-15)
        dead.group.close()
        follower.group.close()
    finally:
        seg.close()


def test_places_are_checked(segment):
    with pytest.raises(ValueError, match="no place"):
        Member(segment, 3, 1.0)
    m = Member(segment, 1, 1.0)
    with pytest.raises(ValueError, match="including worker 1"):
        m.begin(0, 2, 2, [0, 2])
    with pytest.raises(ValueError, match="is not a set"):
        m.begin(0, 2, 2, [1, 5])


@pytest.mark.parametrize("members", [[0, 1, 2, 3, 4], [1, 2, 3], [0, 1, 3, 4], list(range(16)), list(range(2, 15))])
def test_the_mean_adds_the_gradients_in_id_order_whichever_way_it_is_summed(members):
    """Consecutive ids are summed in one reduction, others one by one: both must add in id order, as every
    member's copy of theta must be the same bit for bit (oracle: the same arithmetic written out). Past 8 rows a
    pairwise sum (numpy's along a contiguous axis) would add in another order."""
    seg = Group.create(blocks.run_prefix() + "groupsum", 16, (64,), np.float64)
    try:
        lr, rng = 0.1, np.random.default_rng(9)
        # magnitudes far apart, so that another order of the additions rounds differently
        grads = {w: rng.standard_normal(64) * 10.0 ** rng.integers(-8, 8, 64) for w in members}
        out = {}

        def work(wid):
            m = Member(Attached(seg), wid, 30.0)
            m.begin(0, 1, 1, members)
            theta = np.ones(64)
            m.grad(0)[...] = grads[wid]
            m.step(0, theta, lr)
            m.group.close()
            out[wid] = theta

        threads = [threading.Thread(target=work, args=(w,)) for w in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        s = grads[members[0]] + grads[members[1]]
        for w in members[2:]:
            s = s + grads[w]
        want = np.ones(64) - s * (lr * (1.0 / len(members)))
        assert all(np.array_equal(out[w], want) for w in members)
    finally:
        seg.close()


def serial_l2(plan: dict, k_steps: int, lr: float, n: int, l2: float, l2_rows: int) -> np.ndarray:
    """theta after the sub-steps, in one process; a sub-step no member has rows for is skipped."""
    theta = np.ones(4)
    for k in range(k_steps):
        grads = [grad_of(w, k) + theta for w in sorted(plan) if k < plan[w]]
        if grads:
            term = np.zeros(4)
            term[:l2_rows] = l2 * theta[:l2_rows]
            theta = theta - lr * (sum(grads) / n + term)
    return theta


@pytest.mark.parametrize("plan", [{0: 4, 1: 2, 2: 4}, {0: 2, 1: 1, 2: 2}])
def test_with_l2_a_member_whose_rows_end_early_follows_the_sub_steps(segment, plan):
    """model.l2 moves theta at every sub-step, with or without a member's gradient: a member out of rows follows
    (its copy of theta stays the same bit for bit as the others'); sub-steps no member has rows for (the second
    plan's last two) change nothing and end the following."""
    lr, l2, rows = 0.05, 0.3, 3     # the last row unpenalized, as an intercept
    out = run_members(segment, plan, 4, lr, l2=l2, l2_rows=rows)
    for theta, m in out.values():
        assert np.array_equal(theta, out[0][0]) and not m.left
    np.testing.assert_allclose(out[0][0], serial_l2(plan, 4, lr, 3, l2, rows), rtol=1e-13)
    # the term is in: the same sub-steps without it end elsewhere
    assert np.abs(out[0][0] - serial_l2(plan, 4, lr, 3, 0.0, rows)).max() > 1e-3


def test_a_member_clips_its_own_gradient_before_it_is_published(segment):
    m = Member(segment, 0, 1.0, clip_norm=2.0)
    g = np.array([3.0, 4.0, 0.0, 0.0])             # norm 5
    m.clip(g)
    np.testing.assert_allclose(g, [1.2, 1.6, 0.0, 0.0], rtol=1e-15)
    small = np.array([0.3, 0.4, 0.0, 0.0])
    m.clip(small)                                  # shorter than clip_norm: left as it is
    assert small.tolist() == [0.3, 0.4, 0.0, 0.0] and m.clipped == 1
    for bad in ({"l2": -1.0}, {"clip_norm": float("nan")}, {"l2": 0.1, "l2_rows": 5}):
        with pytest.raises(ValueError, match="do not fit theta"):
            Member(segment, 0, 1.0, **bad)


def test_with_an_optimizer_members_start_from_the_servers_state_and_leave_theirs():
    """Momentum: each member takes the server's published velocity and update count at the group step's start,
    applies the rule to each sub-step's mean, and leaves its velocity in its state area, where the server reads
    it; every member's is the same bit for bit, and equal to the rule applied serially from that state."""
    from psrv import optim
    shape, mu, lr = (4,), 0.5, 0.1
    seg = Group.create(blocks.run_prefix() + "groupopt", 2, shape, np.float64, 3, n_state=1)
    try:
        server = optim.Momentum(np.zeros(shape), momentum=mu, nesterov=False)
        server.set_dense([np.full(shape, 2.0)], 7)   # as if 7 updates had made this velocity
        seg.publish(server, version=5)
        assert seg.server_version() == (5, 7)
        out = {}

        def work(wid):
            g = Group.attach(seg.name, 2, shape, np.float64, 3, n_state=1)
            m = Member(g, wid, 30.0, opt=optim.Momentum(np.empty(shape), momentum=mu, nesterov=False))
            with pytest.raises(Stale, match=r"another theta than the step's \(version 5, not 4\)"):
                m.begin(1, 3, 3, [0, 1], version=4)
            m.begin(1, 3, 3, [0, 1], version=5)
            theta = np.ones(shape)
            for k in range(3):
                np.add(grad_of(wid, k), theta, out=m.grad(k))
                m.step(k, theta, lr)
            m.seal(3)
            out[wid] = (theta, m.opt.steps)
            g.close()
        threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        theta, v = np.ones(shape), np.full(shape, 2.0)
        for k in range(3):
            v = mu * v + sum(grad_of(w, k) + theta for w in (0, 1)) / 2
            theta = theta - lr * v
        assert np.array_equal(out[0][0], out[1][0]) and out[0][1] == out[1][1] == 10
        np.testing.assert_allclose(out[0][0], theta, rtol=1e-13)
        assert np.array_equal(seg.states[0], seg.states[1])
        np.testing.assert_allclose(seg.states[0][0], v, rtol=1e-13)
    finally:
        seg.close()   # its creator: the name goes too


def test_a_member_and_its_segment_must_agree_on_the_optimizers_state(segment):
    from psrv import optim
    with pytest.raises(ValueError, match="holds 0 optimizer state arrays, adam needs 2"):
        Member(Attached(segment), 0, 1.0, opt=optim.Adam(np.empty(4), beta1=0.9, beta2=0.99, eps=1e-8))


@pytest.mark.parametrize("spec,error", [({"name": "sgd"}, "not one with state"),
                                        ({"name": "ftrl"}, "not one with state"),
                                        ("momentum", "not one with state"),
                                        ({"name": "momentum", "momentum": "0.9", "nesterov": False}, "must be numbers"),
                                        ({"name": "adam", "beta1": 0.9, "eps": 1e-8}, "must be numbers")])
def test_a_worker_refuses_a_welcome_naming_an_optimizer_it_cannot_apply(spec, error):
    from workers.worker import _group_optimizer
    with pytest.raises(ValueError, match=error):
        _group_optimizer(spec, (4,), np.float64)
    assert _group_optimizer(None, (4,), np.float64) is None   # plain SGD
    opt = _group_optimizer({"name": "momentum", "momentum": 0.5, "nesterov": True}, (4,), np.float64)
    assert (opt.name, opt.momentum, opt.nesterov, opt.shape) == ("momentum", 0.5, True, (4,))


def test_the_longest_theta_reply_of_a_group_step_fits_a_mailbox():
    """A reply lists the rates of the steps its group step may hold: at train.group_steps' largest (1024, with 256
    members and the largest numbers a run reaches) it still fits the mailbox's reply area; the server fails a run
    rather than drop a reply that would not (a worker would wait for it, register again, and wait again)."""
    from psrv import config, mailbox, protocol
    k = config.load({"train": {"group_steps": 1024}}).train.group_steps
    big = 2 ** 62
    header = {"op": "theta", "clock": big, "version": big, "batch": [big, big, big, big], "group": list(range(256)),
              "lr": [0.1 + 1e-17 * j for j in range(k)], "rid": big}
    assert sum(len(f) for f in protocol.encode(header)) < mailbox.AREA_BYTES


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan"), float("inf")])
def test_a_members_wait_must_be_a_positive_finite_time(segment, timeout_s):
    """A NaN or infinite timeout would let a barrier wait for ever; zero or less, never wait at all."""
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds"):
        Member(Attached(segment), 0, timeout_s)


def test_a_member_whose_gradient_is_not_finite_leaves_instead_of_publishing_it(segment):
    """Member 1's gradient of sub-step 0 is NaN: it leaves at once (its copy alone carries the NaN), and members 0
    and 2 apply the others' gradients, finite, as if it had left."""
    members, out = [0, 1, 2], {}

    def work(wid):
        m = Member(Attached(segment), wid, 30.0)
        m.begin(0, 2, 2, members)
        theta = np.ones(4)
        for k in range(2):
            np.add(grad_of(wid, k), theta, out=m.grad(k))
            if wid == 1 and k == 0:
                m.grad(k)[2] = np.nan
            m.step(k, theta, 0.1)
        out[wid] = (theta, m.left, m.left_why)
        m.group.close()
    threads = [threading.Thread(target=work, args=(w,)) for w in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out[1][1:] == (True, "its gradient was not finite") and np.isnan(out[1][0]).any()
    assert np.array_equal(out[0][0], out[2][0]) and np.isfinite(out[0][0]).all() and not out[0][1]
    # 1/3 of the others' sum: the step's mean is over its members, as when one's rows end (psrv/group.py)
    np.testing.assert_allclose(out[0][0], serial({0: 2, 2: 2}, 2, 0.1, 3), rtol=1e-13)


def test_a_member_keeps_an_outlier_gradient_to_itself_once_it_knows_its_typical_norm():
    """server.max_grad_ratio = 10: after WARMUP sub-steps of norm 2 the bound, renewed at a group step's start,
    is 10 x 2; a gradient of norm 30 makes the member leave without publishing it, one of 19 does not. Before
    WARMUP norms there is no bound."""
    from psrv.guard import WARMUP
    seg = Group.create(blocks.run_prefix() + "groupguard", 1, (4,), np.float64, 4)
    try:
        m = Member(Attached(seg), 0, 30.0, max_grad_ratio=10.0)
        theta, clock = np.ones(4), 0
        m.begin(clock, 4, 4, [0])
        m.grad(0)[...] = [0.0, 0.0, 0.0, 1e6]           # no bound yet: published
        m.step(0, theta, 0.0)
        assert not m.left
        for k in range(1, WARMUP + 3):                   # norms of 2, a group step of 4 sub-steps at a time
            if k % 4 == 0:
                clock += 1
                m.begin(clock, 4, 4, [0])
            m.grad(k % 4)[...] = [1.0, 1.0, 1.0, 1.0]
            m.step(k % 4, theta, 0.0)
        m.begin(clock + 1, 4, 4, [0])
        m.grad(0)[...] = [19.0, 0.0, 0.0, 0.0]
        m.step(0, theta, 0.0)
        assert not m.left
        m.grad(1)[...] = [30.0, 0.0, 0.0, 0.0]
        m.step(1, theta, 0.0)
        assert m.left and m.left_why == "its gradient's norm 30 was over 20, 10 x its typical one"
        m.group.close()
    finally:
        seg.close()


def test_a_member_never_starts_from_a_state_being_written():
    """The server writes its state while a straggler may copy it: VERSION is WRITING meanwhile, and a member that
    sees it (before or after its copy) or another version is told the server went on without it (Stale), which
    the worker answers with a push the server drops as late."""
    from psrv import optim
    seg = Group.create(blocks.run_prefix() + "groupstale", 1, (4,), np.float64, 2, n_state=1)
    try:
        server = optim.Momentum(np.zeros(4), momentum=0.5, nesterov=False)
        seg.publish(server, version=3)
        g = Group.attach(seg.name, 1, (4,), np.float64, 2, n_state=1)
        m = Member(g, 0, 30.0, opt=optim.Momentum(np.empty(4), momentum=0.5, nesterov=False))
        m.begin(1, 2, 2, [0], version=3)
        seg._srv[0] = WRITING
        with pytest.raises(Stale, match="being written"):
            m.begin(2, 2, 2, [0], version=3)
        m.group.close()
    finally:
        seg.close()


@pytest.mark.parametrize("value", [np.inf, 1e200, np.nan])
def test_a_gradient_that_is_not_finite_or_overflows_is_never_published(segment, value):
    """Before any bound on its norm exists (and with none configured): an Inf, a NaN, or entries whose squares
    overflow make the member leave."""
    m = Member(Attached(segment), 0, 30.0)
    m.begin(0, 2, 2, [0])
    m.grad(0)[...] = [1.0, value, 0.0, 0.0]
    m.step(0, np.ones(4), 0.1)
    assert m.left and m.left_why == "its gradient was not finite"
    m.group.close()


def test_a_member_does_not_keep_a_state_the_server_wrote_while_it_copied():
    """The server may publish while a straggler copies its state (VERSION is WRITING meanwhile): the member reads
    VERSION again after the copy and is told the step is over (Stale), never left with a torn state."""
    from psrv import optim
    seg = Group.create(blocks.run_prefix() + "grouptorn", 1, (4,), np.float64, 2, n_state=1)
    try:
        seg.publish(optim.Momentum(np.zeros(4), momentum=0.5, nesterov=False), version=3)
        g = Group.attach(seg.name, 1, (4,), np.float64, 2, n_state=1)
        m = Member(g, 0, 30.0, opt=optim.Momentum(np.empty(4), momentum=0.5, nesterov=False))
        copy = m.opt.set_dense

        def copied_while_written(arrays, steps):
            copy(arrays, steps)
            seg._srv[0] = WRITING            # the server began its next write during the copy
        m.opt.set_dense = copied_while_written
        with pytest.raises(Stale, match="being written"):
            m.begin(1, 2, 2, [0], version=3)
        g.close()
    finally:
        seg.close()


def test_an_infinite_gradient_stays_out_when_the_outlier_bound_itself_overflows():
    """max_grad_ratio^2 x the typical squared norm can overflow: the bound stays finite, so an infinite squared
    norm is still refused."""
    from psrv.guard import WARMUP
    seg = Group.create(blocks.run_prefix() + "groupbig", 1, (4,), np.float64, 4)
    try:
        m = Member(Attached(seg), 0, 30.0, max_grad_ratio=1e200)
        theta, clock = np.ones(4), 0
        for k in range(WARMUP + 4):
            if k % 4 == 0:
                m.begin(clock, 4, 4, [0])
                clock += 1
            m.grad(k % 4)[...] = 1.0
            m.step(k % 4, theta, 0.0)
        m.begin(clock, 4, 4, [0])
        assert m._bound_sq == sys.float_info.max
        m.grad(0)[...] = [1.0, np.inf, 0.0, 0.0]
        m.step(0, theta, 0.0)
        assert m.left and m.left_why == "its gradient was not finite"
        m.group.close()
    finally:
        seg.close()
