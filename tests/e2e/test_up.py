"""`moeserve up` (what `make run` starts): comes up, serves, and stops cleanly on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from services.common.process import free_port, port_in_use

MOESERVE = str(Path(sys.executable).with_name("moeserve"))


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def descendants_of(pid: int) -> list[int]:
    found = []
    for child in children_of(pid):
        found += [child, *descendants_of(child)]
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(
        ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
    ).stdout.strip()
    return bool(state) and not state.startswith("Z")


def greedy_reference(
    model_dir: Path,
    messages: list[dict],
    max_new: int,
    trust_remote_code: bool = False,
    eos: list | None = None,
) -> str:
    """What transformers' greedy decoding says for the same model and chat."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    stop = {"eos_token_id": eos} if eos else {}
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, **stop
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def wait_up(proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until `moeserve up` (stdout piped, text) says it is up; fails if it exits first."""
    deadline, line = time.monotonic() + timeout, ""
    while time.monotonic() < deadline and "moeserve is up" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "moeserve up exited early"


def up_client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)


def start_streams(url: str, model: str, n: int) -> tuple[list[list[str]], list[threading.Thread]]:
    """`n` long SSE completions, each read line by line into its own list; returns once all stream."""
    lines: list[list[str]] = [[] for _ in range(n)]
    started = threading.Barrier(n + 1, timeout=60)

    def one(i: int) -> None:
        body = {
            "model": model,
            "prompt": f"stream {i}",
            "max_tokens": 1500,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                started.abort()  # fail the test now, not at the barrier's timeout
            for line in r.iter_lines():
                lines[i].append(line)
                if line.startswith("data: ") and sum(ln.startswith("data: ") for ln in lines[i]) == 3:
                    started.wait()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    started.wait()
    return lines, threads


def test_up_serves_the_tiny_model_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {**os.environ, "MOESERVE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    errors = tmp_path / "stderr.txt"
    proc = subprocess.Popen(
        [MOESERVE, "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=errors.open("w"),
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline and "moeserve is up" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "moeserve up exited early"
        assert f"http://127.0.0.1:{port}/v1" in line
        (orchestrator,) = children_of(proc.pid)
        assert len(children_of(orchestrator)) == 2  # its prefill and decode instances (local backend)
        kids = descendants_of(proc.pid)
        assert len(kids) >= 3 + 4  # ...and the EP2 + EP2 rank processes under the two workers

        client = up_client(port)
        model = client.models.list().data[0].id
        assert model == "tiny-deepseek_v3"
        res = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
        )
        assert res.choices[0].finish_reason in ("stop", "length")

        # Ctrl-C with four streams running: an ordered stop in under 3 s, a final event for every
        # client, nothing printed on the way out, no process left.
        lines, readers = start_streams(f"http://127.0.0.1:{port}", model, 4)
        printed = errors.stat().st_size
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 3.0
        for t in readers:
            t.join(timeout=10)
        for got in lines:
            events = [ln for ln in got if ln.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert "shutting down" in events[-2]  # an OpenAI error event says why the stream ended
        said = errors.read_text()[printed:]
        assert "Traceback" not in said and "warning" not in said.lower(), said
        deadline = time.monotonic() + 10
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(k) for k in kids), "processes outlived moeserve up"
        assert not port_in_use("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [MOESERVE, "up", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MOESERVE_CACHE": str(tmp_path)},
        )
    assert r.returncode == 2 and "is in use" in r.stderr


def test_up_serves_an_fp8_checkpoint_exactly(tmp_path, fp8_dirs):
    """`moeserve up --model DIR` on a DeepSeek-V3 FP8 checkpoint (block scales, an MTP layer):
    the chat answer is transformers' greedy answer on the dequantized weights."""
    fp8, dequantized = fp8_dirs["deepseek_v3"]
    port = free_port()
    env = {**os.environ, "MOESERVE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [MOESERVE, "up", "--model", str(fp8), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr.txt").open("w"),
        text=True,
    )
    try:
        said = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (said and "moeserve is up" in said[-1]):
            said.append(proc.stdout.readline())
            assert said[-1] or proc.poll() is None, "moeserve up exited early"
        ready = [s for s in said if s.startswith("moeserve worker ready")]
        assert len(ready) == 2 and all("multi-token-prediction layer(s) 3 skipped" in s for s in ready), said
        assert all("FP8 block-quantized weights dequantized" in s for s in ready)
        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Which layers does an FP8 checkpoint quantize?"}]
        res = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=messages, max_tokens=16, temperature=0
        )
        assert res.choices[0].message.content == greedy_reference(dequantized, messages, 16)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_keys_from_a_file_reach_the_orchestrator_without_a_command_line(tmp_path):
    """`ps` must not show secrets: keys and the admin token travel to children in the environment."""
    keys = tmp_path / "keys"
    keys.write_text("# API keys\nk-one\nk-two,k-three\n")
    port = free_port()
    env = {
        **os.environ,
        "MOESERVE_CACHE": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "MOESERVE_ADMIN_TOKEN": "adm-s3cret",
    }
    proc = subprocess.Popen(
        [
            MOESERVE,
            "up",
            "--port",
            str(port),
            "--api-key-file",
            str(keys),
            "--prefill-ep",
            "1",
            "--decode-ep",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_up(proc)
        for pid in descendants_of(proc.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"k-two" not in cmdline and b"adm-s3cret" not in cmdline, cmdline
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        for key in ("k-one", "k-three"):
            assert (
                httpx.get(
                    f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
                ).status_code
                == 200
            )
        admin = httpx.get(f"{url}/admin/pools", headers={"Authorization": "Bearer k-one"}, timeout=10)
        assert admin.status_code == 403  # a user key on the admin API
        admin = httpx.get(f"{url}/admin/pools", headers={"Authorization": "Bearer adm-s3cret"}, timeout=10)
        assert admin.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_up_serves_a_kimi_shaped_model_whose_tokenizer_is_code(tmp_path):
    """A tiny Kimi-K2-shaped model (tests/kimi): tiktoken tokenizer shipped as code, served only with
    --trust-remote-code; the reply is transformers' greedy one, ending where Kimi's replies end."""
    from tests.kimi import IDS, make_tiny_kimi

    model = make_tiny_kimi(tmp_path / "tiny-kimi")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [MOESERVE, "up", "--model", str(model), "--port", str(port), "--trust-remote-code"]
    args += ["--prefill-ep", "1", "--decode-ep", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_up(proc)
        client = up_client(port)
        messages = [{"role": "user", "content": "the answer"}]
        res = client.chat.completions.create(
            model="tiny-kimi", messages=messages, max_tokens=6, temperature=0
        )
        eos = [IDS["[EOS]"], IDS["<|im_end|>"]]
        assert res.choices[0].message.content == greedy_reference(model, messages, 6, True, eos)
        assert res.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_up_serves_both_families_in_bf16(tmp_path, arch):
    """CUDA's default dtype, end to end on the CPU: the KV hand-off carries bf16 pages, and the reply
    is what the bf16 engine alone says for the same prompt."""
    port = free_port()
    env = {**os.environ, "MOESERVE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = [MOESERVE, "up", "--arch", arch, "--port", str(port), "--prefill-ep", "1", "--decode-ep", "1"]
    args += ["--worker-arg=--dtype=bfloat16"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_up(proc)
        client = up_client(port)
        prompt = [5, 17, 42, 8, 99, 3]
        res = client.completions.create(
            model=f"tiny-{arch}", prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        from services.engine import Engine, SamplingParams

        engine = Engine.from_pretrained(tmp_path / f"tiny-{arch}", dtype="bfloat16")
        (alone,) = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        assert res.usage.completion_tokens == 6
        assert res.choices[0].text == _tokenizer_text(tmp_path / f"tiny-{arch}", alone.output_token_ids)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def _tokenizer_text(model_dir: Path, ids: list[int]) -> str:
    from orchestrator.http.tokenizer import Tokenizer

    return Tokenizer(model_dir).decode(ids)
