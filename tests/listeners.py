"""The TCP sockets a process tree listens on, read from /proc (Linux): for tests that check binds."""

from __future__ import annotations

import os
from pathlib import Path

ANY = "any"
"""How an all-interfaces bind (0.0.0.0 or ::) is reported."""


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    return tree


def _address(hex_addr: str) -> str:
    if len(hex_addr) == 8:  # IPv4, little-endian
        ip = ".".join(str(int(hex_addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
        return ANY if ip == "0.0.0.0" else ip
    if set(hex_addr) == {"0"}:
        return ANY
    if hex_addr.startswith("0000000000000000FFFF0000"):  # IPv4-mapped IPv6
        return _address(hex_addr[-8:])
    return hex_addr


def listening(pid: int) -> dict[int, list[str]]:
    """{pid: ["address:port", ...]} for every process of pid's tree that listens on TCP."""
    owner: dict[str, int] = {}
    for p in process_tree(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = p
    out: dict[int, list[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in owner:  # 0A: LISTEN
                addr, port = cols[1].split(":")
                out.setdefault(owner[cols[9]], []).append(f"{_address(addr)}:{int(port, 16)}")
    return out
