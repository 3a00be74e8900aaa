"""The decode side of the hand-off in one process, its prefill played by the test (an Attach that
answers when the test says): the first token goes out as soon as the Attach answers, even while
the engine is busy, and a request cancelled while its KV was on the way ends there."""

from __future__ import annotations

import queue
import threading

import pytest

from services.common.calls import CallError
from services.engine import Engine, SamplingParams
from services.engine.loop import EngineLoop, RequestStream
from services.kv import AttachResult, KVLayout, KVRegion
from services.kv.decode import DecodeHandoff

PROMPT = list(range(5, 30))


class HeldAttach:
    """An AttachClient whose Attaches wait for the test; cancelling one does not stop its answer
    (it was already on the way), as with a real prefill that answers as the cancel goes out."""

    def __init__(self) -> None:
        self.pending: queue.SimpleQueue = queue.SimpleQueue()

    def attach(self, prefill, spec, timeout, on_done):
        self.pending.put(on_done)
        return lambda: None

    def release(self, prefill, room, reason) -> bool:
        return True


@pytest.fixture
def decode(ds_dir):
    engine = Engine.from_pretrained(ds_dir, page_size=4, kv_pool_tokens=512)
    mc, storage = engine.model_config, engine.kv.storage
    layout = KVLayout(mc.architecture, mc.num_layers, tuple(mc.kv_entry_shape), engine.config.dtype, 4)
    region = KVRegion(storage.data_ptr(), storage[0].nbytes, layout.entry_bytes, 4)
    loop = EngineLoop(engine)
    loop.start()
    client = HeldAttach()
    yield engine, loop, DecodeHandoff(loop, layout, region, "127.0.0.1:1", client, 30.0, 30.0), client
    loop.stop()


def start(loop: EngineLoop, side: DecodeHandoff, rid: str, max_tokens: int) -> RequestStream:
    stream = RequestStream()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    loop.run(side.start, rid, PROMPT, params, 7, "127.0.0.1:2", stream)
    return stream


def outputs(stream: RequestStream) -> list:
    outs = [stream.get()]
    while not outs[-1].finished:
        outs.append(stream.get())
    return outs


def test_the_first_token_goes_out_when_the_attach_answers_even_while_the_engine_is_busy(decode):
    engine, loop, side, client = decode
    stream = start(loop, side, "early", 3)
    answer = client.pending.get(timeout=10)  # the pages were reserved and attached
    busy = threading.Event()
    loop.call(busy.wait, 10)  # the engine thread is held (as by a long decode step)
    answer(AttachResult(first_token_id=42, prompt_tokens=len(PROMPT)))
    first = stream.get()
    assert first.new_token_ids == [42] and not first.finished  # out while the engine was still held
    busy.set()
    rest = outputs(stream)
    assert rest[-1].finish_reason == "length" and len(rest[-1].output_token_ids) == 3
    assert rest[-1].output_token_ids[0] == 42
    assert [t for o in [first, *rest] for t in o.new_token_ids] == rest[-1].output_token_ids  # no repeat
    assert loop.run(lambda: engine.kv_stats().used_pages) == 0


def test_a_request_cancelled_while_its_kv_was_on_the_way_ends_when_it_arrives(decode):
    engine, loop, side, client = decode
    stream = start(loop, side, "cancelled", 200)
    answer = client.pending.get(timeout=10)
    assert loop.run(side.abort, "cancelled")  # the Attach is on the way: the source waits for it
    answer(AttachResult(first_token_id=42, prompt_tokens=len(PROMPT)))
    last = outputs(stream)[-1]
    assert last.finish_reason == "abort" and len(last.output_token_ids) <= 1  # not run on to 200
    assert loop.run(lambda: engine.kv_stats().used_pages) == 0 and engine.num_running == 0


@pytest.mark.parametrize(("prefill_says", "blamed"), [("", "prefill"), ("decode", "")])
def test_a_failed_attach_names_the_prefill_unless_prefill_says_the_decode_side_failed(
    decode, prefill_says, blamed
):
    engine, loop, side, client = decode
    stream = start(loop, side, f"failed-{prefill_says}", 4)
    answer = client.pending.get(timeout=10)
    answer(CallError("UNAVAILABLE", "the KV transfer failed", peer=prefill_says))
    with pytest.raises(CallError) as e:
        outputs(stream)
    assert e.value.code == "UNAVAILABLE" and e.value.peer == blamed  # whom the router then avoids
    assert "KV hand-off from prefill" in e.value.message
    assert loop.run(lambda: engine.kv_stats().used_pages) == 0
