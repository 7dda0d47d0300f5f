"""Against a live cluster, only when one is configured (UNCLIP_LIVE_CLUSTER=1 and a kubeconfig): the API
server itself accepts every rendered object (`kubectl apply --dry-run=server`), admission webhooks and
installed CRDs (KEDA) included. Nothing is created."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIVE = os.environ.get("UNCLIP_LIVE_CLUSTER") == "1"


@pytest.mark.skipif(
    not LIVE, reason="set UNCLIP_LIVE_CLUSTER=1 (and KUBECONFIG) to check against a live cluster"
)
@pytest.mark.parametrize("overlay", [os.environ.get("UNCLIP_LIVE_OVERLAY", "dev")])
def test_api_server_accepts_the_overlay(kubectl, overlay):
    proc = subprocess.run(
        [str(kubectl), "apply", "--dry-run=server", "-k", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "deployment.apps/unclip-orchestrator" in proc.stdout
