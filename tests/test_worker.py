"""The optimizer worker's order (Note [update order] in offload/optim.py): prioritised closures run lowest
priority first among those queued, barriers keep everything on their side of them."""
import threading

import pytest
from hypothesis import given, settings, strategies as st

from offload.optim import Worker


def _run(ops):
    """ops: list of priorities (None: barrier). The worker is held until all are queued, so order is decided
    by the queue alone."""
    gate = threading.Event()
    w = Worker()
    ran = []
    w.submit(gate.wait)       # a barrier that holds the thread
    for i, p in enumerate(ops):
        w.submit(lambda i=i: ran.append(i), priority=p)
    gate.set()
    w.sync()
    w.close()
    return ran


def _expected(ops):
    out, epoch = [], []
    for i, p in enumerate(ops):
        if p is None:
            out += [j for _, j in sorted(epoch)] + [i]
            epoch = []
        else:
            epoch.append((p, i))
    return out + [j for _, j in sorted(epoch)]


def test_lowest_priority_first_barriers_hold():
    assert _run([5, 3, 4, None, 1, 0]) == [1, 2, 0, 3, 5, 4]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(0, 6)), max_size=30))
def test_order_matches_the_rule(ops):
    assert _run(ops) == _expected(ops)


def test_error_reraised_in_caller_and_later_closures_skipped():
    w = Worker()
    ran, gate = [], threading.Event()
    w.submit(gate.wait)
    w.submit(lambda: 1 / 0, priority=0)
    w.submit(lambda: ran.append(1), priority=1)
    gate.set()
    with pytest.raises(ZeroDivisionError):
        w.sync()
    assert ran == []
    w.close()


def test_raise_error_unblocks_again_before_raising():
    """A caller may clear an event and then find the failure in submit(): the on_error that ran on the
    worker thread came before that clear, so raise_error runs it again, and the error is raised once."""
    unblocked = []
    w = Worker(on_error=lambda: unblocked.append(threading.current_thread().name))
    w.submit(lambda: 1 / 0, priority=0)
    with w.cv:
        w.cv.wait_for(lambda: w.pending == 0)
    assert len(unblocked) == 1
    with pytest.raises(ZeroDivisionError):
        w.submit(lambda: None, priority=0)
    assert unblocked[-1] == threading.current_thread().name and len(unblocked) == 2
    w.submit(lambda: None, priority=0)     # raised once: the worker runs closures again
    w.sync()
    w.close()


def test_a_ready_closure_overtakes_a_lower_priority_one_still_waiting():
    """Note [update order]: among queued updates the lowest-index one whose gradients have landed runs first;
    with none landed, the one queued first (whose copy lands first) is waited on."""
    gate = threading.Event()
    w = Worker()
    ran = []
    landed = {0: False, 1: True, 2: False, 3: True}
    w.submit(gate.wait)
    for i in (3, 2, 1, 0):     # queued last layer first, as backward lands them
        w.submit(lambda i=i: (ran.append(i), landed.__setitem__(i, True)), priority=i, ready=lambda i=i: landed[i])
    gate.set()
    w.sync()
    w.close()
    # 1 and 3 have landed: 1 first (lowest); then none of 0, 2 is ready: 2 was queued first
    assert ran == [1, 3, 2, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), max_size=20))
def test_with_readiness_every_closure_runs_once_and_ready_ones_go_by_priority(ops):
    gate = threading.Event()
    w = Worker()
    ran = []
    w.submit(gate.wait)
    for i, (p, ok) in enumerate(ops):
        w.submit(lambda i=i: ran.append(i), priority=p, ready=lambda ok=ok: ok)
    gate.set()
    w.sync()
    w.close()
    assert sorted(ran) == list(range(len(ops)))
    first_unready = next((k for k, i in enumerate(ran) if not ops[i][1]), len(ran))
    ready_part = ran[:first_unready]
    assert ready_part == sorted((i for i, (p, ok) in enumerate(ops) if ok), key=lambda i: (ops[i][0], i))
