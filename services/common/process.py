"""Process plumbing shared by the worker and the orchestrator (dependency-free, like `picking`):
free loopback ports, whether an address is loopback only, children that die with their parent,
signals that ask for a stop."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import socket
import threading

PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]  # getsockname() is Any in typeshed; (host, port) for AF_INET
        return port


def port_in_use(host: str, port: int) -> bool:
    """Whether a listener holds the port (connections lingering in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


PARENT_ENV = "MOESERVE_PARENT_PID"
"""Set by a parent that wants its children to die with it (see `spawn_env`)."""


def die_with_parent() -> None:
    """This process gets SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that should die with this process (it calls `die_with_parent_if_asked`).

    The child arms the signal itself, first thing: a `preexec_fn` would run Python between fork
    and exec, which can deadlock in a parent with threads.
    """
    return {**env, PARENT_ENV: str(os.getpid())}


def die_with_parent_if_asked() -> None:
    """Arm the parent-death signal when started by `spawn_env`; leave at once if that parent is gone."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None:
        return
    die_with_parent()
    if os.getppid() != int(parent):  # it died before the signal was armed
        os._exit(1)


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (main thread only)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def loopback_only(host: str) -> bool:
    """Whether listening on `host` reaches this machine's loopback interface alone."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "0.0.0.0" is not loopback; a name may resolve anywhere
