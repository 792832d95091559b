"""Plan priority over HTTP: a high plan's request sent behind a low plan's backlog finishes before
that backlog does, and every low request still finishes. Order, not durations.

One diffusion replica (tests/small_app.py), batches of 4. A low-plan tenant queues 24 images
(3 requests x 8); once the replica holds them (at least 12 still queued, so 3+ batches are left)
a 4-image request arrives. The control sends the same request from a second tenant on the low plan:
FIFO among equals puts it behind the whole backlog, so it finishes last. If priority did nothing,
the high request would finish last too, and the first test would fail.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import small_app

pytestmark = pytest.mark.ray

PLANS = [{"name": "low", "priority": 0, **small_app.UNLIMITED}, {"name": "high", "priority": 2, **small_app.UNLIMITED}]
# 20 steps: a batch of 4 takes long enough that the late request reaches the replica while 3+
# batches of backlog are still queued, even on a busy machine.
BODY = {"prompt": "a lighthouse", "size": "32x32", "steps": 20}


@pytest.fixture(scope="module")
def app(genserve_url: str, tiny_models_dir, tmp_path_factory):
    a = small_app.deploy("prio", base_url=genserve_url, work_dir=tmp_path_factory.mktemp("prio"),
                         models_dir=tiny_models_dir, plans=PLANS,
                         tenants={"bulk": "low", "peer": "low", "vip": "high"},
                         model={"batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01,
                                             "priority_aging_s": 60}})
    yield a
    a.delete()


def _finish_order(app: small_app.SmallApp, late: str) -> list[str]:
    """Who finished in which order: 3 x 8 images from `bulk`, then 4 from `late` once the replica
    has queued the backlog."""
    order: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def post(tenant: str, label: str, n: int) -> None:
        r = httpx.post(app.url + "/v1/images/generations", json={**BODY, "n": n}, headers=app.auth(tenant),
                       timeout=300)
        with lock:
            order.append(label)
            statuses.append(r.status_code)

    bulk = [threading.Thread(target=post, args=("bulk", f"bulk{i}", 8)) for i in range(3)]
    for t in bulk:
        t.start()
    deadline = time.monotonic() + 60
    while (s := app.stats())["queued"] + s["running"] < 24:
        assert time.monotonic() < deadline and not order, (s, order)
        time.sleep(0.02)
    assert s["queued"] >= 12, f"the backlog drained before the late request was sent: {s}"
    last = threading.Thread(target=post, args=(late, "late", 4))
    last.start()
    for t in [*bulk, last]:
        t.join()
    assert statuses == [200] * 4, statuses
    return order


def test_high_plan_is_served_ahead_of_low_backlog_and_low_still_finishes(app: small_app.SmallApp) -> None:
    order = _finish_order(app, "vip")
    assert sorted(order) == ["bulk0", "bulk1", "bulk2", "late"]  # every low request finished
    after = order[order.index("late") + 1:]
    assert after, f"the high plan waited behind the low backlog: {order}"


def test_control_equal_plan_waits_behind_the_backlog(app: small_app.SmallApp) -> None:
    order = _finish_order(app, "peer")
    assert order[-1] == "late", f"an equal-priority request jumped the queue: {order}"
