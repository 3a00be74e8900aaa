"""The two roles of a worker instance, spelled as in the proto, the Helm values and the pod labels."""

from __future__ import annotations

from typing import Literal

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, ...] = ("prefill", "decode")
