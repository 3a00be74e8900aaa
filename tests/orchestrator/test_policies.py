"""Prefill policies: prefix affinity keeps prompts where their prefix is cached, within the load bounds."""

from __future__ import annotations

import collections
import random

import pytest
from smg_grpc_proto.generated import common_pb2

from orchestrator.dispatch.policies import create
from orchestrator.dispatch.router import Router
from orchestrator.fleet.registry import Registry, State
from orchestrator.fleet.worker_facts import DpLoad
from services.common.prefix_hash import block_hashes


def pool(prefill: int, decode: int, ranks: int = 2) -> Registry:
    p = Registry()
    for i in range(prefill):
        inst = p.add("prefill", f"10.0.0.1:{5000 + i}")
        inst.state = State.READY
        inst.loads = [DpLoad(r, 0, 0, 0, 1000) for r in range(ranks)]
    for i in range(decode):
        p.add("decode", f"10.0.0.2:{6000 + i}").state = State.READY
    return p


def chat(system: int, turn: int) -> list[int]:
    rng = random.Random(system)
    head = [rng.randrange(5, 5000) for _ in range(96)]  # a 96-token system prompt: six blocks of 16
    return [*head, 7, turn % 97, turn // 97 + 1, 11]


def test_four_system_prompts_stay_home_and_the_load_stays_shared():
    """Two prefill instances, 4 system prompts x 100 user turns each, 12 requests in flight."""
    router = Router(pool(2, 2), policy=create("prefix_affinity"))
    rng = random.Random(0)
    order = [(s, t) for s in range(4) for t in range(100)]
    rng.shuffle(order)
    holding: dict[int, set] = collections.defaultdict(set)  # (instance, rank) that computed it before
    hits, served, in_flight = 0, collections.Counter(), collections.deque()
    for system, turn in order:
        lease = router.lease(f"r{system}-{turn}", prompt_ids=chat(system, turn))
        where = (lease.prefill.id, lease.prefill_rank)
        hits += where in holding[system]
        holding[system].add(where)
        served[lease.prefill.id] += 1
        in_flight.append(lease)
        if len(in_flight) > 12:
            in_flight.popleft().release()
    assert hits / len(order) >= 0.9  # on a DP rank that holds its system prompt
    assert max(served.values()) / len(order) <= 0.65  # neither instance carries much more than half
    assert all(rank in (0, 1) for places in holding.values() for _, rank in places)


def test_an_overloaded_home_sends_new_work_to_the_least_loaded():
    options = {"balance_abs": "2", "balance_rel": "1.5"}
    router = Router(pool(2, 1), policy=create("prefix_affinity", options))
    leases = [router.lease(f"r{i}", prompt_ids=chat(1, i)) for i in range(3)]
    home = leases[0].prefill
    assert all(lease.prefill is home for lease in leases)  # 2 beyond the idle one: still within bounds
    moved = router.lease("r3", prompt_ids=chat(1, 3))  # 3 beyond 0, and more than 1.5x: out of bounds
    assert moved.prefill is not home
    follow = router.lease("r4", prompt_ids=chat(1, 4))  # both hold the prefix now: the less loaded
    assert follow.prefill is moved.prefill and follow.prefill_rank == moved.prefill_rank


def test_least_load_ignores_prefixes_and_unknown_options_are_refused():
    router = Router(pool(2, 1), policy=create("least_load"))
    picks = [router.lease(f"r{i}", prompt_ids=chat(1, i)) for i in range(4)]
    assert collections.Counter(lease.prefill.id for lease in picks) == {"prefill-1": 2, "prefill-2": 2}
    assert all(lease.prefill_rank is None for lease in picks)
    with pytest.raises(ValueError, match="has no option 'depth'"):
        create("prefix_affinity", {"depth": "3"})
    with pytest.raises(ValueError, match="expected int"):
        create("prefix_affinity", {"block_tokens": "many"})
    with pytest.raises(ValueError, match="unknown prefill policy"):
        create("random")


def test_worker_reports_add_and_remove_targets():
    """KV events correct the index: stored blocks attract a prompt, removed ones no longer do."""
    p = pool(2, 1)
    policy = create("prefix_affinity")
    router = Router(p, policy=policy)
    ids = chat(3, 0)
    hashes = block_hashes(ids, 16)
    other = p.prefill[1]
    stored = common_pb2.KvCacheEvent(stored=common_pb2.KvBlocksStored(blocks=[
        common_pb2.KvBlock(block_hash=h, block_size=16) for h in hashes
    ]))  # fmt: skip
    policy.observe(other.id, 1, stored)  # the second instance's rank 1 reports it holds the prompt
    lease = router.lease("a", prompt_ids=ids)
    assert (lease.prefill, lease.prefill_rank) == (other, 1)
    lease.release()
    policy.observe(
        other.id, 1, common_pb2.KvCacheEvent(removed=common_pb2.KvBlocksRemoved(block_hashes=hashes))
    )
    policy.observe(other.id, 1, common_pb2.KvCacheEvent(cleared=common_pb2.KvCacheCleared()))
    assert policy._index == {}  # its own decision (rank 1 of `other`) was dropped by the removal too
    policy.forget(other.id, any_rank=True)
