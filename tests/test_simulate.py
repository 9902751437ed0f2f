"""Tests of the transport simulator itself (pipemlaan/engine/simulate.py) on small hand-written
programs: NCCL's in-order streams and grouped posts, gloo's buffered sends, collectives, host
waits, message mismatches, data-readiness checks, unmatched ops and the deadlock report.
(tests/test_schedule.py uses the simulator on the real schedules.)

Run: cd /work/main && .venv/bin/python -m pytest tests/test_simulate.py -q
"""

from __future__ import annotations


import pytest

from pipemlaan.engine.schedule import Collective, Compute, Msg, Op, Post, Wait
from pipemlaan.engine.simulate import simulate

G = "g"
GROUPS2 = {"world": (0, 1), G: (0, 1), "g1": (0, 1), "g2": (0, 1)}


def msg(kind: str, i: int, src: int, dst: int) -> Msg:
    return Msg(kind, i, src, dst)


def send(m: Msg, group: str = G) -> Op:
    return Op(True, m, group)


def recv(m: Msg, group: str = G) -> Op:
    return Op(False, m, group)


def make(m: Msg) -> Compute:
    return Compute("make", m.index, (), (m,))


def use(m: Msg) -> Compute:
    return Compute("use", m.index, (m,))


A = msg("fwd", 0, 0, 1)   # rank 0 -> rank 1
B = msg("grad", 0, 1, 0)  # rank 1 -> rank 0


def ranks_in(res) -> set[int]:
    return {r for r, _, _ in res.deadlock or ()}


# 1 ------------------------------------------------------------------------------------------
def test_send_then_recv_on_both_sides_deadlocks_under_nccl_only():
    progs = {
        0: [make(A), Post((send(A),)), Wait(send(A)), Post((recv(B),)), Wait(recv(B)), use(B)],
        1: [make(B), Post((send(B),)), Wait(send(B)), Post((recv(A),)), Wait(recv(A)), use(A)],
    }
    res = simulate(progs, GROUPS2, "nccl")
    assert not res.ok and res.deadlock, res.describe()
    assert ranks_in(res) == {0, 1}, res.describe()
    assert res.deadlock[-1][2] == res.deadlock[0][0], res.describe()   # a closed cycle
    assert "DEADLOCK" in res.describe()
    res = simulate(progs, GROUPS2, "gloo")
    assert res.ok and res.deadlock is None and not res.errors, res.describe()


# 2 ------------------------------------------------------------------------------------------
def test_send_and_recv_in_one_post_group_is_fine_under_nccl():
    progs = {
        0: [make(A), Post((send(A), recv(B))), Wait(send(A)), Wait(recv(B)), use(B)],
        1: [make(B), Post((send(B), recv(A))), Wait(send(B)), Wait(recv(A)), use(A)],
    }
    for rules in ("nccl", "gloo"):
        res = simulate(progs, GROUPS2, rules)
        assert res.ok, res.describe()


# 3, 4 ---------------------------------------------------------------------------------------
def crossing(g_a: str, g_b: str, rank1_recv_first: bool):
    p1 = [Post((recv(A, g_a),)), Post((send(B, g_b),))]
    if not rank1_recv_first:
        p1.reverse()
    return {
        0: [make(A), Post((send(A, g_a),)), Post((recv(B, g_b),)),
            Wait(send(A, g_a)), Wait(recv(B, g_b)), use(B)],
        1: [make(B)] + p1 + [Wait(send(B, g_b)), Wait(recv(A, g_a)), use(A)],
    }


def test_crossing_order_on_one_communicator_deadlocks_under_nccl():
    res = simulate(crossing(G, G, rank1_recv_first=False), GROUPS2, "nccl")
    assert not res.ok and res.deadlock, res.describe()
    assert ranks_in(res) == {0, 1}, res.describe()
    assert "behind" in res.describe(), res.describe()
    assert simulate(crossing(G, G, rank1_recv_first=False), GROUPS2, "gloo").ok
    res = simulate(crossing(G, G, rank1_recv_first=True), GROUPS2, "nccl")
    assert res.ok, res.describe()


def test_crossing_order_on_two_communicators_is_fine_under_nccl():
    for rules in ("nccl", "gloo"):
        res = simulate(crossing("g1", "g2", rank1_recv_first=False), GROUPS2, rules)
        assert res.ok, res.describe()


def test_stream_order_holds_a_later_kernel_back():
    # rank 0's second kernel could match at once, but the first (never matched) is in front
    progs = {
        0: [make(A), Post((recv(B),)), Post((send(A),)), Wait(send(A))],
        1: [Post((recv(A),)), Wait(recv(A)), use(A)],
    }
    res = simulate(progs, GROUPS2, "nccl")
    assert not res.ok and res.deadlock, res.describe()
    assert f"wait {send(A)} (behind {recv(B)})" in res.describe(), res.describe()
    assert simulate(progs, GROUPS2, "gloo").errors        # gloo: the recv is never matched


# 5 ------------------------------------------------------------------------------------------
def test_mismatched_message_is_an_error_but_the_run_goes_on():
    X, Y = msg("fwd", 3, 0, 1), msg("grad", 2, 0, 1)
    progs = {
        0: [make(Y), Post((send(Y),)), Wait(send(Y))],
        1: [Post((recv(X),)), Wait(recv(X)), use(X)],
    }
    for rules in ("nccl", "gloo"):
        res = simulate(progs, GROUPS2, rules)
        assert not res.ok and res.deadlock is None, res.describe()
        assert len(res.errors) == 1 and "mismatch" in res.errors[0], res.describe()
        assert "fwd[3]" in res.errors[0] and "grad[2]" in res.errors[0]


def test_matching_counts_per_channel_in_order():
    m0, m1 = msg("fwd", 0, 0, 1), msg("fwd", 1, 0, 1)
    progs = {
        0: [make(m0), make(m1), Post((send(m0),)), Post((send(m1),)), Wait(send(m1))],
        1: [Post((recv(m1),)), Post((recv(m0),)), Wait(recv(m0)), Wait(recv(m1))],
    }
    res = simulate(progs, GROUPS2, "gloo")
    assert sum("mismatch" in e for e in res.errors) == 2, res.describe()


# 6 ------------------------------------------------------------------------------------------
def test_collectives_in_different_orders_deadlock():
    progs = {
        0: [Collective("g1", "c"), Collective("g2", "c")],
        1: [Collective("g2", "c"), Collective("g1", "c")],
    }
    for rules in ("nccl", "gloo"):
        res = simulate(progs, GROUPS2, rules)
        assert not res.ok and res.deadlock, res.describe()
        assert ranks_in(res) == {0, 1}, res.describe()


def test_collectives_with_different_names_are_an_error():
    progs = {0: [Collective("world", "barrier")], 1: [Collective("world", "gather")]}
    for rules in ("nccl", "gloo"):
        res = simulate(progs, GROUPS2, rules)
        assert not res.ok and any("different collectives" in e for e in res.errors), \
            res.describe()
    same = {0: [Collective("world", "barrier")], 1: [Collective("world", "barrier")]}
    assert simulate(same, GROUPS2, "nccl").ok


def test_compute_collective_waits_behind_posted_ops_on_its_group_under_nccl():
    # rank 0's all-reduce on g is enqueued behind its recv, which rank 1 sends after its own
    # all-reduce: NCCL's stream order deadlocks, gloo's does not
    progs = {
        0: [Post((recv(B),)), Compute("step", 0, collective=G), Wait(recv(B))],
        1: [Compute("step", 0, collective=G), make(B), Post((send(B),)), Wait(send(B))],
    }
    res = simulate(progs, GROUPS2, "nccl")
    assert not res.ok and res.deadlock, res.describe()
    assert simulate(progs, GROUPS2, "gloo").ok


# 7 ------------------------------------------------------------------------------------------
def test_consuming_before_waiting_is_an_error():
    progs = {
        0: [make(A), Post((send(A),)), Wait(send(A))],
        1: [Post((recv(A),)), use(A), Wait(recv(A))],
    }
    for rules in ("nccl", "gloo"):
        res = simulate(progs, GROUPS2, rules)
        assert not res.ok and res.deadlock is None, res.describe()
        assert any("consumes" in e and "rank 1" in e for e in res.errors), res.describe()


def test_sending_what_was_never_produced_is_an_error():
    progs = {
        0: [Post((send(A),)), Wait(send(A)), make(A)],
        1: [Post((recv(A),)), Wait(recv(A)), use(A)],
    }
    for rules in ("nccl", "gloo"):
        res = simulate(progs, GROUPS2, rules)
        assert not res.ok and any("produced" in e and "rank 0" in e for e in res.errors), \
            res.describe()


def test_wait_on_an_op_never_posted_and_double_post_are_errors():
    progs = {
        0: [Wait(send(A)), make(A), make(A), Post((send(A),)), Post((send(A),)),
            Wait(send(A))],
        1: [Post((recv(A),)), Wait(recv(A))],
    }
    res = simulate(progs, GROUPS2, "nccl")
    assert any("never posted" in e for e in res.errors), res.describe()
    assert any("posted again" in e for e in res.errors), res.describe()


# 8 ------------------------------------------------------------------------------------------
def test_host_wait_blocks_later_posts():
    X, Y = msg("fwd", 0, 1, 0), msg("fwd", 0, 0, 1)
    progs = {
        0: [Post((recv(X),)), Wait(recv(X)), make(Y), Post((send(Y),)), Wait(send(Y))],
        1: [Post((recv(Y),)), Wait(recv(Y)), make(X), Post((send(X),)), Wait(send(X))],
    }
    for rules in ("nccl", "gloo"):
        res = simulate(progs, GROUPS2, rules)
        assert not res.ok and res.deadlock, res.describe()
        assert ranks_in(res) == {0, 1}, res.describe()
        assert "has not yet posted" in res.describe(), res.describe()
        assert res.positions == {0: (1, 5), 1: (1, 5)}


# 9 ------------------------------------------------------------------------------------------
def test_an_op_never_matched_is_not_ok():
    progs = {0: [make(A), Post((send(A),))], 1: []}
    for rules in ("nccl", "gloo"):
        res = simulate(progs, GROUPS2, rules)
        assert not res.ok and res.deadlock is None, res.describe()
        assert any("never" in e and str(A) in e for e in res.errors), res.describe()


def test_waiting_for_a_rank_that_finished_reports_a_chain():
    progs = {0: [Post((recv(B),)), Wait(recv(B))], 1: []}
    res = simulate(progs, GROUPS2, "nccl")
    assert res.deadlock and res.deadlock[0][0] == 0 and res.deadlock[-1][0] == 1, \
        res.describe()
    assert res.deadlock[-1][2] is None and "finished" in res.deadlock[-1][1]


# 10 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rules", ["nccl", "gloo"])
def test_a_chain_of_four_ranks_passing_2000_messages(rules):
    n, world = 2000, 4
    groups = {"world": tuple(range(world))}
    groups.update({f"pipe:{r}-{r + 1}": (r, r + 1) for r in range(world - 1)})
    progs = {}
    for r in range(world):
        acts = []
        for i in range(n):
            if r > 0:
                m = msg("fwd", i, r - 1, r)
                op = recv(m, f"pipe:{r - 1}-{r}")
                acts += [Post((op,)), Wait(op)]
            out = msg("fwd", i, r, r + 1) if r < world - 1 else None
            acts.append(Compute("step", i, (m,) if r > 0 else (),
                                (out,) if out else ()))
            if out:
                op = send(out, f"pipe:{r}-{r + 1}")
                acts.append(Post((op,)))
                if i:
                    acts.append(Wait(send(msg("fwd", i - 1, r, r + 1), f"pipe:{r}-{r + 1}")))
        if r < world - 1:
            acts.append(Wait(send(msg("fwd", n - 1, r, r + 1), f"pipe:{r}-{r + 1}")))
        acts.append(Collective("world", "summary"))
        progs[r] = acts
    res = simulate(progs, groups, rules)
    assert res.ok, res.describe()
