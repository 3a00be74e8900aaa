"""Mooncake's start-up chatter: hidden below debug, all of it shown at debug."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

START = "from services.common.logs import setup_logging; setup_logging({level!r}); "
START += "from services.kv.transfer import TransferEngine; print(TransferEngine().session_id)"


@pytest.mark.parametrize("level, chatty", [("info", False), ("debug", True)])
def test_mooncake_start_up_is_quiet_unless_debug(level, chatty):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MC_", "MOESERVE_LOG", "GLOG_"))}
    run = subprocess.run(
        [sys.executable, "-c", START.format(level=level)], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.startswith("127.0.0.1:")
    assert ("Transfer Engine" in run.stderr) is chatty
    assert ("segment descriptor" in run.stderr) is chatty
    if not chatty:
        assert run.stderr == ""
