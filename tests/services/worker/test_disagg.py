"""Prefill and decode workers as real processes, driven over gRPC the way a router drives them."""

from __future__ import annotations

import concurrent.futures as cf
import io
import itertools
import json
import shutil
import time
import zipfile

import grpc
import pytest
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import common_pb2

from services.common import wire
from services.common.process import free_port
from services.engine import Engine, SamplingParams
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
from tests.cluster import LocalCluster

PROMPT = list(range(5, 70))
rooms = itertools.count(100)


def request(
    prefill_addr: str, room: int, max_new: int = 16, stream: bool = True, prompt=PROMPT
) -> pb.GenerateRequest:
    host, port = prefill_addr.rsplit(":", 1)
    return pb.GenerateRequest(
        request_id=f"req-{room}",
        tokenized=pb.TokenizedInput(input_ids=prompt),
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True),
        disaggregated_params=pb.DisaggregatedParams(
            bootstrap_host=host, bootstrap_port=int(port), bootstrap_room=room
        ),
        stream=stream,
    )


@pytest.fixture(scope="module")
def pair(ds_dir):
    c = LocalCluster()
    try:
        c.worker("prefill", "prefill", ds_dir, "--handoff-timeout", "3", "--max-prefill-tokens", "16")
        c.worker("decode", "decode", ds_dir, "--handoff-timeout", "3")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def expected(ds_dir):
    engine = Engine.from_pretrained(ds_dir)
    return engine.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]


def run_pair(c: LocalCluster, room: int, decode_first: bool = False, delay: float = 0.0, **kw):
    req = request(c.addresses["prefill"], room, **kw)
    with cf.ThreadPoolExecutor(2) as ex:
        first, second = ("decode", "prefill") if decode_first else ("prefill", "decode")
        f1 = ex.submit(lambda: list(c.stub(first).Generate(req, timeout=60)))
        time.sleep(delay)
        f2 = ex.submit(lambda: list(c.stub(second).Generate(req, timeout=60)))
        out = {first: f1, second: f2}
        return out["prefill"].result(), out["decode"].result()


@pytest.mark.parametrize("decode_first", [False, True])
def test_disaggregated_generate_is_exact_in_either_arrival_order(pair, expected, decode_first):
    prefill_out, decode_out = run_pair(pair, next(rooms), decode_first=decode_first, delay=0.3)
    streamed = [t for r in decode_out if r.HasField("chunk") for t in r.chunk.token_ids]
    done = decode_out[-1].complete
    assert streamed == list(done.output_ids) == expected.output_token_ids
    assert done.finish_reason == "length" and done.prompt_tokens == len(PROMPT)
    assert list(prefill_out[-1].complete.output_ids) == expected.output_token_ids[:1]
    pair.assert_idle()


def test_non_streaming_and_concurrent_rooms(pair, expected):
    with cf.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda r: run_pair(pair, r, stream=False), [next(rooms) for _ in range(6)]))
    for _, decode_out in results:
        assert len(decode_out) == 1 and list(decode_out[0].complete.output_ids) == expected.output_token_ids
    pair.assert_idle()


def test_decode_first_one_call_carries_the_request_to_prefill(pair, expected):
    """Decode-first: only decode is called; its Attach brings prefill the request (to the DP rank the
    router names, or prefill's choice). The last step's tokens come in the complete alone."""
    for name in ("prefill", "decode"):
        info = pair.stub(name).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.server_args[wire.SERVER_ARG] is True
    for rank in (None, 0):
        req = request(pair.addresses["prefill"], next(rooms))
        out = list(pair.stub("decode").Generate(req, timeout=60, metadata=wire.forward_metadata(rank)))
        streamed = [t for r in out if r.HasField("chunk") for t in r.chunk.token_ids]
        done = out[-1].complete
        assert list(done.output_ids) == expected.output_token_ids and done.finish_reason == "length"
        assert streamed == expected.output_token_ids[:-1]  # one message fewer
    pair.assert_idle()


def test_decode_first_sends_the_first_token_on_the_routers_feed_as_prefill_samples_it(pair, expected):
    """A router subscribed to prefill's FirstTokens (confirmed by an empty first batch) gets the first
    token of each decode-first request that names its feed, by room: the token decode then sends too.
    Nothing goes there for a request that names no feed or another router's, nor for one whose first
    token ends it (a stop token: decode's answer says it ends there). A second subscriber of the feed
    ends the first one's stream."""
    channel = grpc.insecure_channel(pair.addresses["prefill"])
    feeds = kvpb_grpc.KVHandoffStub(channel)
    feed = feeds.FirstTokens(kvpb.FirstTokensRequest(feed="router-a"), timeout=60)
    assert not next(feed).tokens  # subscribed
    named, other, unnamed, stopped = next(rooms), next(rooms), next(rooms), next(rooms)
    for room, meta in (
        (named, wire.forward_metadata(None, "router-a")),
        (other, wire.forward_metadata(None, "router-b")),
        (unnamed, wire.forward_metadata(None)),
        (stopped, wire.forward_metadata(None, "router-a")),
    ):
        req = request(pair.addresses["prefill"], room)
        if room == stopped:
            req.sampling_params.stop_token_ids.append(expected.output_token_ids[0])
        done = list(pair.stub("decode").Generate(req, timeout=60, metadata=meta))[-1].complete
        if room == stopped:
            assert list(done.output_ids) == expected.output_token_ids[:1] and done.finish_reason == "stop"
        else:
            assert list(done.output_ids) == expected.output_token_ids
    first = next(feed).tokens
    assert [(t.room, t.request_id, t.token_id, t.prompt_tokens) for t in first] == [
        (named, f"req-{named}", expected.output_token_ids[0], len(PROMPT))
    ]
    again = feeds.FirstTokens(kvpb.FirstTokensRequest(feed="router-a"), timeout=60)
    assert not next(again).tokens
    assert list(feed) == []  # taken over: the first stream ended, with nothing more on it
    again.cancel()
    channel.close()
    pair.assert_idle()


def test_decode_first_failures_name_the_prefill(pair):
    """A forwarded request that prefill cannot take fails the decode call, which says it is prefill's
    failure (the router then avoids that prefill, not this decode), and holds no pages after."""
    gone = request(f"127.0.0.1:{free_port()}", next(rooms))
    with pytest.raises(grpc.RpcError) as e:
        list(pair.stub("decode").Generate(gone, timeout=30, metadata=wire.forward_metadata(None)))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert wire.failed_peer(e.value.trailing_metadata()) == "prefill"
    bad_rank = request(pair.addresses["prefill"], next(rooms))
    with pytest.raises(grpc.RpcError) as e:
        list(pair.stub("decode").Generate(bad_rank, timeout=30, metadata=wire.forward_metadata(7)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "7" in e.value.details()
    assert wire.failed_peer(e.value.trailing_metadata()) == "prefill"
    pair.assert_idle()


LONG = 160
"""Tokens per request in the max_num_seqs test: long enough that six requests always overlap
(with 16 a busy machine could finish each before the next arrived, and see one running)."""


def test_more_rooms_than_decode_seqs_wait_and_all_finish_exactly(pair, ds_dir):
    """max_num_seqs holds for requests arriving by hand-off: the extra wait, none is dropped."""
    pair.worker("decode-2seqs", "decode", ds_dir, "--max-num-seqs", "2", "--handoff-timeout", "30")
    params = SamplingParams(max_tokens=LONG, temperature=0.0, ignore_eos=True)
    expected = Engine.from_pretrained(ds_dir).generate([PROMPT], params)[0]
    reqs = [request(pair.addresses["prefill"], next(rooms), max_new=LONG) for _ in range(6)]
    seen = []

    def one(req):
        with cf.ThreadPoolExecutor(1) as ex:
            pf = ex.submit(lambda: list(pair.stub("prefill").Generate(req, timeout=60)))
            out = list(pair.stub("decode-2seqs").Generate(req, timeout=60))
            pf.result()
        return out

    with cf.ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(one, r) for r in reqs]
        while not all(f.done() for f in futures):
            load = pair.load("decode-2seqs")
            seen.append((load.num_running_reqs, load.num_waiting_reqs))
            time.sleep(0.01)
        outs = [f.result() for f in futures]
    for out in outs:
        assert [t for r in out if r.HasField("chunk") for t in r.chunk.token_ids] == expected.output_token_ids
    assert max(running for running, _ in seen) == 2  # never more than max_num_seqs in the batch
    assert max(waiting for _, waiting in seen) >= 1  # the others waited
    pair.assert_idle("prefill", "decode-2seqs")


def test_room_without_decode_times_out_and_frees(pair):
    req = request(pair.addresses["prefill"], next(rooms))
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(pair.stub("prefill").Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no decode attached" in e.value.details()
    assert time.monotonic() - start < 10
    pair.assert_idle()


def test_decode_without_prefill_generate_times_out_and_frees(pair):
    req = request(pair.addresses["prefill"], next(rooms))
    with pytest.raises(grpc.RpcError) as e:
        list(pair.stub("decode").Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "received no Generate" in e.value.details()
    pair.assert_idle()


def test_abort_on_decode_mid_stream_frees_both(pair):
    room = next(rooms)
    req = request(pair.addresses["prefill"], room, max_new=2000)
    with cf.ThreadPoolExecutor(2) as ex:
        pf = ex.submit(lambda: list(pair.stub("prefill").Generate(req, timeout=60)))
        stream = pair.stub("decode").Generate(req, timeout=60)
        first = next(stream)
        assert first.HasField("chunk")
        res = pair.stub("decode").Abort(pb.AbortRequest(request_id=req.request_id), timeout=5)
        assert res.success
        rest = list(stream)
        assert rest[-1].complete.finish_reason == "abort"
        pf.result()
    pair.assert_idle()


def test_cancelled_client_frees_pages(pair):
    room = next(rooms)
    req = request(pair.addresses["prefill"], room, max_new=2000)
    with cf.ThreadPoolExecutor(2) as ex:
        pf = ex.submit(lambda: list(pair.stub("prefill").Generate(req, timeout=60)))
        stream = pair.stub("decode").Generate(req, timeout=60)
        next(stream)
        stream.cancel()  # the client goes away mid-stream
        pf.result()
    pair.assert_idle()


def test_fingerprint_mismatch_is_a_clear_error(tmp_path, ds_dir):
    # Same model, different page size: KV pages are laid out differently.
    c = LocalCluster()
    try:
        c.worker("prefill", "prefill", ds_dir, "--page-size", "8", "--handoff-timeout", "3")
        c.worker("decode", "decode", ds_dir, "--page-size", "16", "--handoff-timeout", "3")
        with pytest.raises(grpc.RpcError) as e:
            run_pair(c, next(rooms))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "KV layout mismatch" in e.value.details() and "page 8 tokens" in e.value.details()
        c.assert_idle()
    finally:
        c.stop()


def test_killed_prefill_fails_fast_and_decode_frees(ds_dir, tmp_path):
    slow = tmp_path / "slow"  # a longer prompt computed 4 tokens per step gives time to kill prefill
    shutil.copytree(ds_dir, slow)
    c = LocalCluster()
    try:
        c.worker("prefill", "prefill", slow, "--max-prefill-tokens", "4")
        c.worker("decode", "decode", slow)
        prompt = list(range(1, 400))
        req = request(c.addresses["prefill"], next(rooms), prompt=prompt)
        with cf.ThreadPoolExecutor(2) as ex:
            ex.submit(lambda: list(c.stub("prefill").Generate(req, timeout=60)))
            dec = ex.submit(lambda: list(c.stub("decode").Generate(req, timeout=60)))
            deadline = time.monotonic() + 10
            while c.load("decode").num_used_tokens == 0 and time.monotonic() < deadline:
                time.sleep(0.02)  # decode has reserved its pages and attached
            assert c.load("decode").num_used_tokens > 0
            start = time.monotonic()
            c.kill("prefill")
            with pytest.raises(grpc.RpcError) as e:
                dec.result()
        assert time.monotonic() - start < 10
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert "KV hand-off from prefill" in e.value.details()
        load = c.load("decode")
        assert load.num_used_tokens == 0 and load.num_total_reqs == 0
    finally:
        c.stop()


def test_info_rpcs_and_unimplemented(pair, ds_dir):
    stub = pair.stub("decode")
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    cfg = json.loads((ds_dir / "config.json").read_text())
    assert info.architectures == ["DeepseekV3ForCausalLM"] and info.vocab_size == cfg["vocab_size"]
    assert list(info.eos_token_ids) == [cfg["eos_token_id"]]
    server = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert server.server_type == "grpc" and server.server_args["role"] == "decode"
    assert server.scheduler_info["kv_stranded_pages"] == 0
    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=5)
    assert loads.dp_rank_count == 1 and loads.loads[0].disaggregation.mode == "decode"
    data = b"".join(c.data for c in stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=5))
    assert "tokenizer.json" in zipfile.ZipFile(io.BytesIO(data)).namelist()
    with pytest.raises(grpc.RpcError) as e:
        stub.Embed(pb.EmbedRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_bad_generate_requests(pair):
    stub = pair.stub("decode")
    bad = pb.GenerateRequest(request_id="bad", tokenized=pb.TokenizedInput(input_ids=[]))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(bad, timeout=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt is empty" in e.value.details()
    long = pb.GenerateRequest(request_id="long", tokenized=pb.TokenizedInput(input_ids=[1] * 5000))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(long, timeout=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context limit" in e.value.details()
    pair.assert_idle()


def test_monolithic_generate_without_disaggregation(pair, expected):
    req = pb.GenerateRequest(
        request_id="mono",
        tokenized=pb.TokenizedInput(input_ids=PROMPT),
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True),
    )
    out = list(pair.stub("prefill").Generate(req, timeout=30))
    assert list(out[-1].complete.output_ids) == expected.output_token_ids


def test_full_decode_pool_is_resource_exhausted_and_frees(ds_dir):
    """A decode pool with room for one prompt: the second waits, then gets RESOURCE_EXHAUSTED."""
    c = LocalCluster()
    try:
        c.worker("prefill", "prefill", ds_dir, "--handoff-timeout", "5")
        c.worker("decode", "decode", ds_dir, "--handoff-timeout", "2", "--kv-pool-tokens", "128")
        prompt = list(range(1, 100))
        # The first request's prefill half never comes: its decode pages stay reserved until the
        # prefill gives up on the room (5 s).
        holder = request(c.addresses["prefill"], next(rooms), prompt=prompt)
        second = request(c.addresses["prefill"], next(rooms), prompt=prompt)
        with cf.ThreadPoolExecutor(4) as ex:
            held = ex.submit(lambda: list(c.stub("decode").Generate(holder, timeout=60)))
            while c.load("decode").num_used_tokens == 0:
                time.sleep(0.02)
            ex.submit(lambda: list(c.stub("prefill").Generate(second, timeout=60)))
            with pytest.raises(grpc.RpcError) as e:
                list(c.stub("decode").Generate(second, timeout=60))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "no room for a 99-token prompt" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                held.result()
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        c.assert_idle()
    finally:
        c.stop()
