"""The `moeserve` console script, run as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

MOESERVE = str(Path(sys.executable).with_name("moeserve"))


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MOESERVE, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def test_make_tiny_model_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny-qwen"
    r = run("make-tiny-model", str(out), "--arch", "qwen3_moe")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tok
    assert (out / "tokenizer.json").is_file()
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size < 8 * 2**20  # a few MB


def test_generate_creates_the_cached_tiny_model(tmp_path):
    r = run("generate", "--prompt", "hello", "--max-tokens", "5", env={"MOESERVE_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "DeepseekV3ForCausalLM" in r.stdout
    assert "finish_reason=" in r.stdout
    assert (tmp_path / "tiny-deepseek_v3" / "config.json").is_file()


def test_generate_reports_a_bad_model_dir(tmp_path):
    r = run("generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2
    assert "has no config.json" in r.stderr


def test_unknown_command():
    r = run("frobnicate")
    assert r.returncode == 2 and "No such command 'frobnicate'" in r.stderr


def test_every_command_is_listed_and_passes_its_own_help():
    r = run("--help")
    assert r.returncode == 0
    for command in ("up", "serve", "worker", "make-tiny-model", "generate", "inspect-model", "pools"):
        assert command in r.stdout
    r = run("serve", "--help")
    assert r.returncode == 0 and "--membership" in r.stdout and "--admin-token" in r.stdout


def test_generate_runs_a_kimi_tokenizer_only_with_the_opt_in(tmp_path):
    from tests.kimi import make_tiny_kimi

    model = str(make_tiny_kimi(tmp_path / "kimi"))
    refused = run("generate", "--model", model, "--prompt", "hi")
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr
    r = run("generate", "--model", model, "--prompt", "hi", "--max-tokens", "4", "--trust-remote-code")
    assert r.returncode == 0, r.stderr
    assert "finish_reason=" in r.stdout
