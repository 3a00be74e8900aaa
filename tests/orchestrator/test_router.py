"""The router's lease: least loaded (decode, then prefill), ties in turn, counted and ended once."""

from __future__ import annotations

import pytest

from orchestrator.dispatch.router import NoWorkers, Router
from orchestrator.fleet.registry import Registry, State


def pool(prefill: int, decode: int) -> Registry:
    p = Registry()
    for i in range(prefill):
        p.add("prefill", f"10.0.0.1:{5000 + i}").state = State.READY
    for i in range(decode):
        p.add("decode", f"10.0.0.2:{6000 + i}").state = State.READY
    return p


def test_ties_are_taken_in_turn():
    router = Router(pool(2, 3))
    ports = []
    for _ in range(6):
        lease = router.lease()
        ports.append((lease.decode.port, lease.prefill.port))
        lease.release()  # every pick sees an idle pool: all tie
    assert [d for d, _ in ports] == [6000, 6001, 6002, 6000, 6001, 6002]
    assert [p for _, p in ports] == [5000, 5001, 5000, 5001, 5000, 5001]


def test_held_leases_spread_over_the_pool():
    router = Router(pool(2, 3))
    leases = [router.lease() for _ in range(6)]
    assert len({lease.decode.port for lease in leases[:3]}) == 3
    assert [w.inflight for w in router.registry.decode] == [2, 2, 2]
    assert [w.inflight for w in router.registry.prefill] == [3, 3]


def test_the_least_loaded_worker_is_picked():
    p = pool(2, 2)
    p.decode[0].inflight, p.prefill[1].inflight = 5, 1
    lease = Router(p).lease()
    assert (lease.decode, lease.prefill) == (p.decode[1], p.prefill[0])


def test_release_gives_back_both_workers_and_the_room_once():
    p = pool(1, 1)
    router = Router(p)
    first, second = router.lease(), router.lease()
    first.release()
    first.release()
    assert (p.prefill[0].inflight, p.decode[0].inflight) == (1, 1)
    assert router.live_rooms == {second.room}
    second.release()
    assert (p.prefill[0].inflight, p.decode[0].inflight) == (0, 0) and router.live_rooms == set()


def test_rooms_are_unique_among_live_leases():
    router = Router(pool(1, 1), seed=0)
    rooms = [router.lease().room for _ in range(2000)]
    assert len(set(rooms)) == len(rooms) and all(0 < r < 2**31 for r in rooms)


@pytest.mark.parametrize("state", [State.STARTING, State.DRAINING, State.FAILED, State.GONE])
def test_only_ready_instances_get_requests_and_none_left_is_an_error(state):
    p = pool(2, 2)
    p.decode[0].state = state
    router = Router(p)
    assert {router.lease(f"r{i}").decode.port for i in range(3)} == {6001}
    assert [w.inflight for w in p.decode] == [0, 3] and p.decode[1].requests == {"r0", "r1", "r2"}
    p.decode[1].state = State.DRAINING
    with pytest.raises(
        NoWorkers, match=f"no ready decode instance \\(decode-3 {state.value}, decode-4 draining\\)"
    ):
        router.lease()
    assert sum(w.inflight for w in p.prefill) == 3  # a failed lease counts nothing
    assert len(router.live_rooms) == 3


def test_a_pinned_rank_s_room_points_at_it_as_sglang_s_follow_bootstrap_room_reads_it():
    from orchestrator.dispatch.policies import create
    from orchestrator.fleet.registry import DpLoad

    p = pool(1, 1)
    p.prefill[0].loads = [DpLoad(r, 0, 0, 0, 100) for r in range(3)]
    router = Router(p, seed=0, policy=create("prefix_affinity", {"block_tokens": "2"}))
    seen = set()
    for i in range(60):
        lease = router.lease(f"r{i}", prompt_ids=[i, i + 1, i + 2, i + 3])
        assert lease.prefill_rank is not None and lease.room % 3 == lease.prefill_rank and lease.room >= 1
        seen.add(lease.prefill_rank)
        lease.release()
    assert seen == {0, 1, 2}
