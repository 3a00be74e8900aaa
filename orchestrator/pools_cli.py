"""`moeserve pools status|scale|drain`: the operator's view of the pools, over the admin API.

`--url` (MOESERVE_URL, default http://127.0.0.1:8000) and `--admin-token` (MOESERVE_ADMIN_TOKEN;
`moeserve up` needs none on loopback). `--output json` prints the admin API's JSON unchanged.
Exit codes: 0 done, 2 invalid arguments, 3 orchestrator unreachable, 4 unauthorised, 5 timed
out, 6 refused by the orchestrator (e.g. a static pool cannot scale, no such instance).
"""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from typing import Annotated, Any, NoReturn, cast

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

EXIT_INVALID, EXIT_UNREACHABLE, EXIT_UNAUTHORISED, EXIT_TIMEOUT, EXIT_REFUSED = 2, 3, 4, 5, 6

app = typer.Typer(
    help="Show, scale and drain the prefill and decode pools (admin API).", no_args_is_help=True
)
errors = Console(stderr=True)


def out() -> Console:
    """stdout as it is now (a terminal's width, or a wide line when piped: tables stay whole)."""
    return Console(width=None if sys.stdout.isatty() else 160)


class Output(StrEnum):
    text = "text"
    json = "json"


Url = Annotated[str, typer.Option(envvar="MOESERVE_URL", help="the orchestrator's base URL")]
Token = Annotated[str, typer.Option(envvar="MOESERVE_ADMIN_TOKEN", help="the admin token, if it has one")]
Out = Annotated[Output, typer.Option("--output", help="text (a table) or json")]


class Admin:
    """The admin API over HTTP; any failure exits with its documented code and one clear line."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def __call__(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            r = httpx.request(method, f"{self.url}/admin{path}", headers=self.headers, timeout=10, **kw)
        except httpx.HTTPError as e:
            fail(EXIT_UNREACHABLE, f"cannot reach the orchestrator at {self.url}: {e}")
        if r.status_code in (401, 403):
            fail(EXIT_UNAUTHORISED, f"not allowed ({r.status_code}): {_message(r)}")
        if r.status_code >= 400:
            fail(EXIT_REFUSED, f"refused ({r.status_code}): {_message(r)}")
        return cast("dict[str, Any]", r.json())  # the admin API answers with a JSON object


def _message(r: httpx.Response) -> str:
    try:
        return cast(str, r.json()["error"]["message"])  # the API's error envelope: a string
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


def fail(code: int, message: str) -> NoReturn:
    errors.print(f"moeserve pools: {message}", highlight=False)
    raise typer.Exit(code)


def _table(instances: list[dict[str, Any]]) -> Table:
    table = Table(title="instances", title_justify="left")
    for col in (
        "instance",
        "role",
        "address",
        "EP",
        "state",
        "running",
        "waiting",
        "KV used",
        "served",
        "balance",
    ):
        table.add_column(col, justify="right" if col in ("EP", "running", "waiting", "served") else "left")
    for i in instances:
        kv = f"{100 * i['kv_used_tokens'] / i['kv_total_tokens']:.0f}%" if i["kv_total_tokens"] else "-"
        balance = f"{i['balancedness']:.2f}" if i.get("balancedness") is not None else "-"
        state = i["state"] + (f" ({i['reason']})" if i["state"] in ("failed", "gone") and i["reason"] else "")
        table.add_row(
            i["id"], i["role"], i["address"], str(i["ep_size"] or "-"), state, str(i["running"]),
            str(i["waiting"]), kv, str(i["served"]), balance,
        )  # fmt: skip
    return table


def _summary(pools: dict[str, Any]) -> str:
    parts = [
        f"{role}: {pools[role]['ready']}/{pools[role]['desired']} ready" for role in ("prefill", "decode")
    ]
    return f"membership {pools['membership']}; " + ", ".join(parts)


@app.command()
def status(url: Url = "http://127.0.0.1:8000", admin_token: Token = "", output: Out = Output.text) -> None:
    """Every instance: role, EP width, state, running/waiting requests, KV usage, expert balance."""
    admin = Admin(url, admin_token)
    pools, instances = admin("GET", "/pools"), admin("GET", "/instances")["data"]
    if output == Output.json:
        print(json.dumps({"pools": pools, "instances": instances}, indent=2))
        return
    out().print(_table(instances))
    out().print(_summary(pools), highlight=False)


def _settled(pools: dict[str, Any], want: dict[str, int]) -> bool:
    return all(
        pools[role]["ready"] == n and pools[role]["instances"] == n and not pools[role]["states"]["draining"]
        for role, n in want.items()
    )


@app.command()
def scale(
    prefill: Annotated[int | None, typer.Option(min=0, help="prefill instances to have")] = None,
    decode: Annotated[int | None, typer.Option(min=0, help="decode instances to have")] = None,
    wait: Annotated[bool, typer.Option(help="follow until the pools match")] = False,
    timeout: Annotated[
        float,
        typer.Option(help="seconds --wait follows (an EP144 group loading a 671B model takes many minutes)"),
    ] = 1800.0,
    url: Url = "http://127.0.0.1:8000",
    admin_token: Token = "",
    output: Out = Output.text,
) -> None:
    """Scale the pools by whole instances (removed ones drain first)."""
    want = {role: n for role, n in (("prefill", prefill), ("decode", decode)) if n is not None}
    if not want:
        fail(EXIT_INVALID, "say how many: --prefill N and/or --decode M")
    admin = Admin(url, admin_token)
    for role, n in want.items():
        admin("POST", f"/pools/{role}/scale", json={"count": n})
    pools = admin("GET", "/pools")
    if wait:
        deadline = time.monotonic() + timeout
        with Live(_summary(pools), console=out(), transient=output == Output.json) as live:
            while not _settled(pools, want):
                if time.monotonic() > deadline:
                    fail(EXIT_TIMEOUT, f"the pools did not match within {timeout:.0f}s: {_summary(pools)}")
                time.sleep(0.5)
                pools = admin("GET", "/pools")
                live.update(_summary(pools))
    if output == Output.json:
        print(json.dumps(pools, indent=2))
    elif not wait:
        out().print(f"asked for {', '.join(f'{r} {n}' for r, n in want.items())}; {_summary(pools)}")


@app.command()
def drain(
    instance: Annotated[str, typer.Argument(help="the instance id, as `pools status` shows it")],
    deadline: Annotated[float, typer.Option(help="seconds it gets before its requests are ended")] = 300.0,
    wait: Annotated[bool, typer.Option(help="follow until it is gone")] = False,
    url: Url = "http://127.0.0.1:8000",
    admin_token: Token = "",
    output: Out = Output.text,
) -> None:
    """Stop sending an instance work and let it finish (then the backend stops it)."""
    admin = Admin(url, admin_token)
    inst = admin("POST", f"/instances/{instance}/drain", json={"deadline_s": deadline})
    while wait and inst["state"] == "draining":
        time.sleep(0.5)
        inst = next(
            (i for i in admin("GET", "/instances")["data"] if i["id"] == instance), {**inst, "state": "gone"}
        )
    if output == Output.json:
        print(json.dumps(inst, indent=2))
    else:
        out().print(f"{instance}: {inst['state']}", highlight=False)
