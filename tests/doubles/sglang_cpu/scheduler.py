"""A fake SGLang scheduler: what stands behind SGLang's real gRPC servicer in the conformance tests.

SGLang's gRPC worker is a servicer process (smg-grpc-servicer: request manager, scheduler and
health servicers) in front of scheduler processes that own the GPU. This module replaces only the
scheduler processes, and speaks their side of SGLang's internal protocol as SGLang 0.5.23 does:

- requests arrive as pickled `io_struct` objects on `scheduler_input_ipc_name` (PULL, connect);
  outputs leave as `BatchTokenIDOutput` (incremental `output_ids`, a finish reason on the last) to
  the detokenizer socket, control replies (`FlushCacheReqOutput`) to the tokenizer socket;
- DP ranks as SGLang places them: under attention DP (the servicer starts no DP controller) every
  rank leader PULLs the one input socket, so ZMQ deals requests round-robin; under plain DP a
  controller thread deals them by the resolved `--load-balance-method` (`follow_bootstrap_room`:
  room % ranks, after `routed_dp_rank`);
- PD as SGLang's disaggregation does it, through SGLang's real bootstrap server (started by the real
  servicer on a prefill): prefill ranks register there (`PUT /route`, with their load-balance
  method); a prefill rank refuses a request whose room points at another rank under
  `follow_bootstrap_room` (SGLang's "follow_bootstrap_room conflict") or registers the room's rank
  (`/register_dp_rank`) otherwise; a decode rank finds the prefill rank as SGLang's decode does (room
  % prefill ranks, or `/query_dp_ranks`) and fetches the "KV" (prompt length and first token) from
  that rank's endpoint. A room on the wrong rank therefore fails as it would on GPUs;
- loads through SGLang's shared-memory load snapshots, KV events through SGLang's own event publisher
  and block hashes (`kv_events.py`);
- every request, abort and finish is appended to a JSON-lines record for the tests to read.

Tokens are a fixed function of the prompt (`tokens.token_at`), so a test knows the reply.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
from sglang.srt.arg_groups.overrides import resolved_view
from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST
from sglang.srt.managers import io_struct as ios
from sglang.srt.managers.load_snapshot import LoadSnapshot, ShmLoadSnapshotWriter, shm_path_for

from tests.doubles.sglang_cpu.kv_events import KvEventSource
from tests.doubles.sglang_cpu.tokens import token_at

KV_WAIT_S = 30.0  # how long a prefill rank keeps a room's KV for decode, and decode waits for it


def struct(cls: type, **given: Any) -> Any:
    """An io_struct message with `given`, every other required field empty (as the scheduler leaves them)."""
    kwargs = {
        f.name: given.pop(f.name) if f.name in given else []
        for f in msgspec.structs.fields(cls)
        if f.required
    }
    return cls(**kwargs, **given)


def _http(method: str, url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        text = resp.read().decode()
    return json.loads(text) if text.startswith(("{", "[")) else text


@dataclass
class Req:
    msg: ios.TokenizedGenerateReqInput
    rank: int
    sent: int = 0
    """Tokens streamed so far."""
    first: int | None = None
    """Decode: the prefill's first token, once fetched."""
    deadline: float = field(default_factory=lambda: time.monotonic() + KV_WAIT_S)
    asked: bool = False
    """Decode: the KV was asked for."""
    not_before: float = 0.0
    """Nothing is computed for it before this time (a slow health check, a long KV transfer)."""

    @property
    def ids(self) -> list[int]:
        return list(self.msg.input_ids)

    @property
    def fake_transfer(self) -> bool:
        """SGLang's health check and warm-up requests skip the KV transfer."""
        return self.msg.bootstrap_host in (None, FAKE_BOOTSTRAP_HOST)


class Engine:
    """The fake scheduler processes of one worker: its DP ranks, each a thread."""

    def __init__(self, server_args: Any, port_args: Any, record: str, step_s: float, vocab: int,
                 context: int, kv_s_per_token: float = 0.0, health_s: float = 0.0):  # fmt: skip
        cfg = resolved_view(server_args)
        self.args, self.ports, self.step_s, self.vocab = server_args, port_args, step_s, vocab
        self.context, self.kv_s_per_token, self.health_s = context, kv_s_per_token, health_s
        self.role = str(cfg.disaggregation_mode)
        self.controller = cfg.dp_size > 1
        self.num_ranks = cfg.dp_size * cfg.attn_dp_size
        self.method = str(cfg.load_balance_method)
        self.force_query = os.environ.get("SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK") == "1"
        self.page_size = int(cfg.page_size or 1)
        self.max_total_tokens = int(cfg.max_total_tokens or 4096)
        self.max_running = int(cfg.max_running_requests or 8)  # per rank, as a scheduler sizes it
        self.bootstrap = f"http://{cfg.host}:{cfg.disaggregation_bootstrap_port}"
        self.aborted: set[str] = set()
        self.stop = threading.Event()
        self._record_lock = threading.Lock()
        self._record = open(record, "a", buffering=1)  # noqa: SIM115 (closed in close())
        self.ctx = zmq.Context()
        self.ranks = [Rank(self, r) for r in range(self.num_ranks)]
        self.threads = [threading.Thread(target=r.run, name=f"rank{r.rank}", daemon=True) for r in self.ranks]
        if self.controller:
            self.threads.append(threading.Thread(target=self._deal, name="dp-controller", daemon=True))

    def info(self) -> dict[str, Any]:
        """What a scheduler reports when ready (`Scheduler.get_init_info`; the input limit as
        `TpModelWorker` computes it: below the model's context and the KV pool)."""
        return {
            "status": "ready",
            "max_total_num_tokens": self.max_total_tokens,
            "max_req_input_len": min(self.context - 1, self.max_total_tokens - 1) - 5,
            "startup_time": time.time(),
        }

    def start(self) -> None:
        for t in self.threads:
            t.start()
        for r in self.ranks:
            r.ready.wait(30)

    def write(self, event: str, **fields: Any) -> None:
        with self._record_lock:
            self._record.write(json.dumps({"event": event, "role": self.role, **fields}) + "\n")

    def _deal(self) -> None:
        """SGLang's DataParallelController: one input, dealt to ranks by the load-balance method."""
        pull = self.ctx.socket(zmq.PULL)
        pull.connect(self.ports.scheduler_input_ipc_name)
        turn = 0
        while not self.stop.is_set():
            if not pull.poll(50):
                continue
            msg = pull.recv_pyobj()
            if not isinstance(msg, ios.TokenizedGenerateReqInput):
                for r in self.ranks:
                    r.inbox.put(msg)
                continue
            if msg.routed_dp_rank is not None:
                target = msg.routed_dp_rank
            elif self.method == "follow_bootstrap_room" and msg.bootstrap_room is not None:
                target = msg.bootstrap_room % self.num_ranks
            else:
                target, turn = turn, (turn + 1) % self.num_ranks
            self.ranks[target].inbox.put(msg)
        pull.close(0)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.ctx.destroy(linger=0)
        self._record.close()


class Rank:
    """One DP rank's scheduler (its attention-TP leader: the rank that talks to the servicer)."""

    def __init__(self, engine: Engine, rank: int):
        self.e, self.rank = engine, rank
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.ready = threading.Event()
        self.reqs: dict[str, Req] = {}
        self.kv: dict[int, tuple[int, int]] = {}
        """Prefill: room -> (prompt length, first token), until decode fetched it."""
        self.waiting_fetch: dict[int, tuple[bytes, float]] = {}
        """Prefill: rooms decode asked for before their prefill ran (asker, deadline)."""
        self.prefill_dp: dict[str, tuple[int, bool]] = {}
        """Decode: per bootstrap address, the prefill's (DP ranks, follows the room)."""

    # --- the thread -------------------------------------------------------------------------------

    def run(self) -> None:
        e = self.e
        out_name = e.ports.tokenizer_ipc_name if e.args.skip_tokenizer_init else e.ports.detokenizer_ipc_name
        self.out = e.ctx.socket(zmq.PUSH)
        self.out.connect(out_name)
        self.control = e.ctx.socket(zmq.PUSH)
        self.control.connect(e.ports.tokenizer_ipc_name)
        self.pull = None
        if not e.controller:
            self.pull = e.ctx.socket(zmq.PULL)
            self.pull.connect(e.ports.scheduler_input_ipc_name)
        self.kv_server = e.ctx.socket(zmq.ROUTER)
        kv_port = self.kv_server.bind_to_random_port("tcp://127.0.0.1")
        self.kv_peers: dict[str, zmq.Socket] = {}
        self.loads = ShmLoadSnapshotWriter(shm_path_for(e.ports.instance_id), e.num_ranks, self.rank)
        self.events = KvEventSource(e.args, self.rank, e.page_size)
        if e.role == "prefill":
            self._register(kv_port)
        self.ready.set()
        poller = zmq.Poller()
        for sock in (self.pull, self.kv_server):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        next_step = time.monotonic()
        while not e.stop.is_set():
            for sock, _ in poller.poll(timeout=max(0, int((next_step - time.monotonic()) * 1000))):
                if sock is self.pull:
                    self.inbox.put(sock.recv_pyobj())
                elif sock is self.kv_server:
                    self._kv_asked(*sock.recv_multipart())
            self._read_peers()
            while not self.inbox.empty():
                self._handle(self.inbox.get())
            if time.monotonic() >= next_step:
                self._step()
                next_step = time.monotonic() + e.step_s
        self.events.close()
        self.loads.close()

    def _register(self, kv_port: int) -> None:
        """A prefill rank's registration with the bootstrap server (as `CommonKVManager` sends it)."""
        e = self.e
        attn = (1, 0) if e.controller else (e.num_ranks, self.rank)  # (size, rank) of attention DP
        system = (e.num_ranks, self.rank) if e.controller else (1, 0)  # of plain DP
        body = {
            "attn_tp_size": 1, "attn_tp_rank": 0, "attn_cp_size": 1, "attn_cp_rank": 0,
            "attn_dp_size": attn[0], "attn_dp_rank": attn[1], "pp_size": 1, "pp_rank": 0,
            "system_dp_size": system[0], "system_dp_rank": system[1],
            "rank_ip": "127.0.0.1", "rank_port": kv_port, "page_size": e.page_size,
            "kv_cache_dtype": "auto", "load_balance_method": e.method,
        }  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                _http("PUT", f"{e.bootstrap}/route", body)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # --- messages from the servicer --------------------------------------------------------------

    def _handle(self, msg: Any) -> None:
        e = self.e
        if isinstance(msg, ios.TokenizedGenerateReqInput):
            self._admit(msg)
        elif isinstance(msg, ios.AbortReq):
            e.write("abort", rid=msg.rid, rank=self.rank, abort_all=bool(msg.abort_all))
            e.aborted.add(msg.rid)  # every rank drops it (SGLang broadcasts control requests)
            for r in e.ranks:
                if r is not self:
                    r.inbox.put(("drop", msg.rid))
            self._drop(msg.rid)
        elif isinstance(msg, tuple) and msg[0] == "drop":
            self._drop(msg[1])
        elif isinstance(msg, ios.FlushCacheReqInput):
            self.control.send_pyobj(ios.FlushCacheReqOutput(success=True))

    def _admit(self, msg: ios.TokenizedGenerateReqInput) -> None:
        e = self.e
        sp = msg.sampling_params
        e.write(
            "generate", rid=msg.rid, rank=self.rank, input_ids=list(msg.input_ids),
            room=msg.bootstrap_room, bootstrap=f"{msg.bootstrap_host}:{msg.bootstrap_port}",
            routed_dp_rank=msg.routed_dp_rank, max_new_tokens=sp.max_new_tokens,
            temperature=sp.temperature, sampling_seed=getattr(sp, "sampling_seed", None),
            custom_params=sp.custom_params, stop_token_ids=sorted(sp.stop_token_ids or ()),
        )  # fmt: skip
        if msg.rid in e.aborted:
            return
        req = Req(msg, self.rank)
        if msg.rid.startswith("HEALTH_CHECK"):
            req.not_before = time.monotonic() + e.health_s
        elif e.role == "prefill":
            req.not_before = time.monotonic() + e.kv_s_per_token * len(msg.input_ids)
        room = msg.bootstrap_room
        placed = e.role == "prefill" and not req.fake_transfer and msg.disagg_prefill_dp_rank is None
        if placed and e.num_ranks > 1:  # SGLang's prefill: the rank check of `CommonKVSender`
            if e.method != "follow_bootstrap_room" or e.force_query:
                registration = {"bootstrap_room": room, "dp_rank": self.rank}
                _http("POST", f"{e.bootstrap}/register_dp_rank", registration)
            elif self.rank != room % e.num_ranks:
                conflict = (
                    f"follow_bootstrap_room conflict: dispatched to dp_rank {self.rank} but bootstrap_room "
                    f"{room} implies dp_rank {room % e.num_ranks}. Set "
                    "SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1 to allow mixed routing."
                )
                self._abort(req, conflict)
                return
        self.reqs[msg.rid] = req

    def _drop(self, rid: str) -> None:
        req = self.reqs.pop(rid, None)
        if req is not None:
            self.kv.pop(req.msg.bootstrap_room, None)
            self.e.write("finish", rid=rid, rank=self.rank, reason="abort", sent=req.sent)
            reason = {"type": "abort", "message": "Abort in waiting queue", "status_code": 499}
            self.out.send_pyobj(ios.AbortReq(rid=rid, finished_reason=reason))

    # --- the "GPU" ---------------------------------------------------------------------------------

    def _step(self) -> None:
        """One scheduler iteration: prefill ranks prefill, decode ranks decode one token each."""
        e = self.e
        now = time.monotonic()
        for req in list(self.reqs.values()):
            if now >= req.not_before:
                self._advance(req, now)
        self.loads.write(LoadSnapshot(
            timestamp=time.time(), dp_rank=self.rank, num_running_reqs=len(self.reqs),
            num_used_tokens=sum(len(r.msg.input_ids) + r.sent for r in self.reqs.values()),
            num_total_tokens=e.max_total_tokens, max_total_num_tokens=e.max_total_tokens,
            max_running_requests=e.max_running,
        ))  # fmt: skip

    def _advance(self, req: Req, now: float) -> None:
        e, msg = self.e, req.msg
        ids, n, room = req.ids, msg.sampling_params.max_new_tokens or 16, msg.bootstrap_room
        if e.role == "prefill":
            if req.sent == 0:
                first = token_at(ids, 0, e.vocab)
                self._emit(req, [first], {"type": "length", "length": 1} if req.fake_transfer else None)
                if req.fake_transfer:
                    return
                self._kv_ready(room, len(ids), first)
            if room not in self.kv:  # decode took the KV
                self._emit(req, [], {"type": "length", "length": 1})
            elif now > req.deadline:
                self.kv.pop(room, None)
                self._abort(req, "KV transfer timed out: no decode fetched this room")
            return
        if e.role == "decode" and not req.fake_transfer and req.first is None:
            where = f"{msg.bootstrap_host}:{msg.bootstrap_port}"
            try:
                self._fetch(req)
            except OSError as err:  # SGLang's decode fails the request when the prefill is unreachable
                self._abort(req, f"Failed to get kvcache from prefill instance {where}: {err}")
                return
            if req.first is None and now > req.deadline:
                self._abort(req, f"Failed to get kvcache from prefill instance {where} for room {room}")
            return
        k = req.sent
        token = req.first if k == 0 and req.first is not None else token_at(ids, k, e.vocab)
        self._emit(req, [token], {"type": "length", "length": n} if k + 1 >= n else None)

    def _abort(self, req: Req, message: str) -> None:
        """The scheduler ends the request itself (as SGLang's FINISH_ABORT on a failed transfer)."""
        self._emit(req, [], {"type": "abort", "status_code": 500, "message": message})

    def _emit(self, req: Req, tokens: list[int], finished: dict | None) -> None:
        """One output of the request (new tokens, and its finish reason on the last: an abort's
        status and message end the gRPC call with them)."""
        req.sent += len(tokens)
        self.out.send_pyobj(struct(
            ios.BatchTokenIDOutput, rids=[req.msg.rid], finished_reasons=[finished], output_ids=[tokens],
            decoded_texts=[""], decode_ids=[tokens], read_offsets=[0], skip_special_tokens=[True],
            spaces_between_special_tokens=[True], no_stop_trim=[False],
            prompt_tokens=[len(req.msg.input_ids)], completion_tokens=[req.sent], cached_tokens=[0],
            reasoning_tokens=[0], output_token_entropy_val=None, output_token_sampling_mask=None,
            output_hidden_states=None, routed_experts=None, indexer_topk=None,
            placeholder_tokens_idx=None, placeholder_tokens_val=None,
        ))  # fmt: skip
        if finished is not None:
            self._done(req, finished)
        if tokens and self.e.role == "prefill" and req.sent == 1 and not req.fake_transfer:
            self.events.stored(list(req.msg.input_ids))

    def _done(self, req: Req, reason: dict) -> None:
        self.reqs.pop(req.msg.rid, None)
        self.e.write("finish", rid=req.msg.rid, rank=self.rank, reason=reason["type"], sent=req.sent,
                     message=reason.get("message", ""))  # fmt: skip

    # --- the KV hand-off ---------------------------------------------------------------------------

    def _kv_ready(self, room: int, length: int, first: int) -> None:
        self.kv[room] = (length, first)
        asker = self.waiting_fetch.pop(room, None)
        if asker is not None:
            self._kv_asked(asker[0], json.dumps({"room": room}).encode())

    def _kv_asked(self, who: bytes, body: bytes) -> None:
        """A decode rank asks this prefill rank for a room's KV; answered once the prefill ran."""
        room = json.loads(body)["room"]
        if room in self.kv:
            length, first = self.kv.pop(room)
            self.kv_server.send_multipart(
                [who, json.dumps({"room": room, "length": length, "first": first}).encode()]
            )
        else:
            self.waiting_fetch[room] = (who, time.monotonic() + KV_WAIT_S)

    def _fetch(self, req: Req) -> None:
        """Decode: find the prefill rank as SGLang's decode does, then ask it for the room's KV (once)."""
        msg = req.msg
        if req.asked:
            return
        boot = f"http://{msg.bootstrap_host}:{msg.bootstrap_port}"
        if boot not in self.prefill_dp:
            info = _http(
                "GET",
                f"{boot}/route?prefill_dp_rank=-1&prefill_cp_rank=-1&target_tp_rank=-1&target_pp_rank=-1",
            )
            self.prefill_dp[boot] = (int(info["dp_size"]), bool(info["follow_bootstrap_room"]))
        dp, follows = self.prefill_dp[boot]
        if msg.disagg_prefill_dp_rank is not None:
            rank = msg.disagg_prefill_dp_rank
        elif dp == 1:
            rank = 0
        elif follows and not self.e.force_query:
            rank = msg.bootstrap_room % dp
        else:
            found = _http("POST", f"{boot}/query_dp_ranks", {"bootstrap_rooms": [msg.bootstrap_room]})
            if str(msg.bootstrap_room) not in found:
                return  # asked again next step
            rank = int(found[str(msg.bootstrap_room)])
        peer = _http(
            "GET", f"{boot}/route?prefill_dp_rank={rank}&prefill_cp_rank=0&target_tp_rank=0&target_pp_rank=0"
        )
        address = f"tcp://{peer['rank_ip']}:{peer['rank_port']}"
        if address not in self.kv_peers:
            sock = self.e.ctx.socket(zmq.DEALER)
            sock.connect(address)
            self.kv_peers[address] = sock
        self.kv_peers[address].send(json.dumps({"room": msg.bootstrap_room}).encode())
        req.asked = True
        self.e.write("kv_fetch", rid=msg.rid, rank=self.rank, room=msg.bootstrap_room, prefill_rank=rank)

    def _read_peers(self) -> None:
        for sock in self.kv_peers.values():
            while sock.poll(0):
                got = json.loads(sock.recv())
                for req in self.reqs.values():
                    if req.msg.bootstrap_room == got["room"] and req.first is None:
                        if got["length"] != len(req.msg.input_ids):
                            self._abort(req, "KV of another prompt")
                        else:
                            req.first = got["first"]
                        break
