"""`moeserve worker`'s own defaults: the GPU when the node has one (bf16), the CPU otherwise (fp32)."""

from __future__ import annotations

import argparse

import pytest
import torch
import typer

from services.worker.__main__ import app, build_config


def config_of(*args: str):
    ctx = typer.main.get_command(app).make_context("worker", ["--role", "prefill", "--model", "/m", *args])
    return build_config(argparse.Namespace(**ctx.params))


@pytest.mark.parametrize("gpu", [True, False])
def test_the_device_defaults_to_the_gpu_when_there_is_one(monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    engine = config_of().engine
    assert (engine.device, engine.dtype) == (("cuda", "bfloat16") if gpu else ("cpu", "float32"))


def test_an_explicit_device_and_dtype_win(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = config_of("--device", "cpu", "--dtype", "bfloat16").engine
    assert (engine.device, engine.dtype) == ("cpu", "bfloat16")
