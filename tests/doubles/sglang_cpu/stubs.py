"""Stand-ins for the two GPU-bound packages SGLang imports unconditionally, so its own code runs here.

- `triton` (`sglang.srt.utils.common` imports it at the top): the wheel is ~700 MB installed and
  only compiles GPU kernels, none of which the servicer, the argument parser or the EPLB loader runs.
- `torchvision` (`sglang.srt.multimodal.internvl_utils` imports `torchvision.transforms` through
  `sglang.srt.configs`): the PyPI wheel links CUDA torch and fails to import on the CPU build.

Both are replaced by permissive modules: any attribute is a harmless object, `triton.jit` and the
like are identity decorators, CamelCase names are empty classes (so `isinstance` checks hold), and
`triton.runtime.driver.active` raises, which makes SGLang's helpers conclude there is no GPU.
Install before the first `import sglang`; never `torch.compile` in such a process (torch then
believes triton exists).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

STUBBED = ("triton", "torchvision")
TRITON_VERSION = "3.7.1"  # the version SGLang 0.5.23 pins


class _Anything:
    """A value of a stubbed module: callable, subscriptable, a decorator when given a function."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _Anything):
            return args[0]  # used as a decorator
        return _Anything(f"{self._name}()")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name == "active":  # triton.runtime.driver.active: there is no GPU driver
            raise RuntimeError(f"{self._name}.active: no GPU driver (stubbed)")
        return _Anything(f"{self._name}.{name}")

    def __getitem__(self, item: Any) -> Any:
        return _Anything(f"{self._name}[]")

    def __mro_entries__(self, bases: tuple[type, ...]) -> tuple[type, ...]:
        return (object,)

    def __bool__(self) -> bool:
        return False

    def __iter__(self) -> Any:
        return iter(())

    def __or__(self, other: Any) -> Any:
        return self

    __ror__ = __or__

    def __repr__(self) -> str:
        return f"<stub {self._name}>"


def _decorator(*args: Any, **kwargs: Any) -> Any:
    if len(args) == 1 and not kwargs and callable(args[0]):
        return args[0]
    return lambda fn: fn


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name in ("jit", "autotune", "heuristics", "must_use_result"):
            return _decorator
        if name.lstrip("_")[:1].isupper():
            cls = type(name, (), {"__init__": lambda self, *a, **k: None})
            setattr(self, name, cls)
            return cls
        return _Anything(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".", 1)[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        if spec.name == "triton":
            module.__version__ = TRITON_VERSION
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Make `import triton` / `import torchvision` (and their submodules) give the stand-ins."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    loaded = [m for m in sys.modules if m.split(".", 1)[0] == "sglang"]
    if loaded:
        raise RuntimeError(f"install the stubs before importing SGLang (already imported: {loaded[0]})")
    # transformers decides once (cached) whether torchvision is there; it is not, whatever SGLang sees.
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()
    sys.meta_path.insert(0, _Finder())
