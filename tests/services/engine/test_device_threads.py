"""Every thread that queues GPU work or waits for it works on the rank's GPU (the current CUDA device
is per thread), and the KV hand-off never reads a layer before the GPU has written it.

Run on the CPU with `torch.cuda` answering as a machine with GPUs would (`tests/fake_cuda.py`):
its `set_device` records the thread that called it, its events count records and waits."""

from __future__ import annotations

import torch

from services.engine import Engine, SamplingParams
from services.engine.loop import EngineLoop
from services.kv import KVLayout, TransferEngine
from services.kv.rooms import AttachSpec, Room
from services.kv.sender import Finish, KVSender, Write
from services.models.device import DeviceMark
from tests.fake_cuda import GPU, cuda_runtime, fake_gpu
from tests.services.engine.test_fake_cuda import cuda_engine, one_rank


def test_the_engine_thread_works_on_the_ranks_gpu(ds_dir, monkeypatch):
    engine = Engine.from_pretrained(ds_dir)  # idle: the loop only waits for commands
    with cuda_runtime(monkeypatch) as cuda:
        engine.runner.device = torch.device("cuda", 3)  # as rank 3 of a node runs it
        loop = EngineLoop(engine)
        loop.start()
        try:
            assert loop.run(torch.cuda.current_device) == 3
        finally:
            loop.stop()
    assert cuda.devices_set_in("engine-loop") == {3}


class LayerLog:
    """A KV listener that keeps the marks it is handed."""

    def __init__(self) -> None:
        self.marks: list[DeviceMark] = []

    def on_layer(self, layer, start, end, pages, written) -> None:
        self.marks.append(written)

    def on_finish(self, output) -> None:
        pass


def test_each_layers_kv_is_marked_on_the_gpu_after_its_writes_are_queued(ds_dir, monkeypatch):
    par = one_rank(ds_dir)
    with fake_gpu(monkeypatch) as cuda:
        engine = cuda_engine(ds_dir, par, max_prefill_tokens=8)
        log = LayerLog()
        engine.add_request(list(range(1, 14)), SamplingParams(max_tokens=1), listener=log)
        engine.step()  # the first chunk: one mark per layer
    layers = engine.model_config.num_layers
    assert len(log.marks) == layers and len(cuda.events) == layers
    assert all(e.recorded == 1 for e in cuda.events)
    assert GPU.type != "cpu"


def test_the_kv_sender_waits_for_each_mark_in_its_own_thread_on_the_ranks_gpu(monkeypatch):
    with cuda_runtime(monkeypatch) as cuda:
        transfer = TransferEngine()  # Mooncake over TCP, writing into its own buffer
        src, dst = torch.arange(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)
        for buf in (src, dst):
            transfer.register(buf.data_ptr(), buf.numel())
        sender = KVSender(transfer, device=torch.device("cuda", 2))
        layout = KVLayout("test", 1, (64,), "uint8", 1)
        room = Room(7, attach=AttachSpec(7, "r", layout, transfer.session_id, dst.data_ptr(), 64, (0,), 1))
        marks = [DeviceMark(torch.device("cuda", 2)) for _ in range(2)]
        done = []
        for i, mark in enumerate(marks):  # two layers' writes: 32 bytes each
            sender.put(Write(room, ([src.data_ptr() + 32 * i], [dst.data_ptr() + 32 * i], [32]), mark))
        sender.put(Finish(room, lambda: done.append(torch.equal(src, dst))))
        assert sender.settle()
    assert done == [True]
    assert cuda.devices_set_in("kv-sender") == {2}
    # Each write waited for its layer (merged writes wait for the later mark, which covers both).
    assert cuda.events[-1].waited_in == ["kv-sender"]
    assert all(e.waited_in in ([], ["kv-sender"]) for e in cuda.events)
