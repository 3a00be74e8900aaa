"""The orchestrator's HTTP settings (`moeserve serve` flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DISPATCH = ("auto", "dual")


@dataclass(frozen=True)
class ApiConfig:
    """What the HTTP edge serves and whom it lets in."""

    model_dir: Path
    """Model directory: tokenizer and chat template; its name is the default model id."""
    served_model_name: str = ""
    """The model id clients send; empty means the model directory's name."""
    api_keys: frozenset[str] = frozenset()
    """Bearer keys accepted on /v1/*; empty means no authentication (local use only)."""
    max_concurrency: int = 256
    """Requests in flight beyond this get 429 with Retry-After."""
    max_queue: int = 64
    """Requests that may wait for a place once max_concurrency are in flight (0: none wait)."""
    queue_timeout_s: float = 10.0
    """Longest wait in that queue before a 429."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies get 413."""
    admin_token: str = ""
    """Bearer token of /admin/*; empty means the admin API answers loopback clients only, and
    only while the server listens on loopback alone (`public`)."""
    public: bool = False
    """The server listens beyond loopback (`--host 0.0.0.0`, a pod IP): without an admin token the
    admin API is then closed to every client, since a proxy beside it (Istio's sidecar connects
    from 127.0.0.6) makes remote clients look local."""
    key_token_rate: float = 0.0
    """Tokens per second each API key may use (prompt + generated); 0: no limit."""
    key_token_burst: float = 0.0
    """Most tokens a key may use at once (default: a minute's worth of its rate)."""
    trust_remote_code: bool = False
    """Load a tokenizer that is code shipped with the model (Kimi K2's): it runs in this process."""
    dispatch: str = "auto"
    """How a request reaches its pair: auto (decode-first where both workers serve it, else SGLang's
    dual dispatch; `services.common.wire`) or dual (always both workers, as SMG does)."""

    def __post_init__(self) -> None:
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", Path(self.model_dir).name)
        if self.dispatch not in DISPATCH:
            raise ValueError(f"--dispatch is {self.dispatch!r}; it must be one of {', '.join(DISPATCH)}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency is {self.max_concurrency}; it must be at least 1")


def read_keys(path: Path | None) -> list[str]:
    """API keys from a file: one per line (or comma-separated), blank lines and # comments skipped."""
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the API key file {path}: {e.strerror}") from None
    return [
        k.strip() for line in lines if not line.lstrip().startswith("#") for k in line.split(",") if k.strip()
    ]


def env_keys() -> list[str]:
    return [k for k in os.environ.get("MOESERVE_API_KEYS", "").split(",") if k]
