"""Shared glue of the typer command lines (both sides use it: no torch, no engine imports)."""

from __future__ import annotations

import argparse
from enum import Enum, StrEnum
from typing import Annotated, Any

import typer


class ModelArch(StrEnum):
    """The tiny model families a command can build (`services.tools.tiny.ARCHS`)."""

    deepseek_v3 = "deepseek_v3"
    qwen3_moe = "qwen3_moe"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


LogLevelOption = Annotated[
    LogLevel,
    typer.Option(
        envvar="MOESERVE_LOG_LEVEL", case_sensitive=False,
        help="this process and its children; third-party logs (Mooncake's glog too) only at debug",
    ),
]  # fmt: skip
LogFormatOption = Annotated[
    LogFormat, typer.Option(envvar="MOESERVE_LOG_FORMAT", help="json: one object per line, with request_id")
]
LogRequestsOption = Annotated[
    bool, typer.Option(envvar="MOESERVE_LOG_REQUESTS", help="one line per finished request, with its id")
]


def run_app(app: typer.Typer, argv: list[str] | None, prog: str) -> int:
    """Run a typer app as a `main(argv) -> exit code` function (usage errors give 2, as argparse did)."""
    try:
        app(args=argv, prog_name=prog, standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def namespace(params: dict[str, Any]) -> argparse.Namespace:
    """A command's parameters as a namespace, choices as their plain values."""
    return argparse.Namespace(**{k: v.value if isinstance(v, Enum) else v for k, v in params.items()})
