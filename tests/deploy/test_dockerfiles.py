"""The Dockerfiles, checked without a container engine: what they copy exists, what they start starts."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from unclip.runtime import settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
# Image name in the manifests -> its Dockerfile; the decoder image also runs the super-resolution stages.
SERVICES = ["orchestrator", "encoder", "prior", "decoder", "safety", "gateway"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_one_dockerfile_per_service():
    assert [p.name for p in DOCKERFILES] == sorted(f"{s}.Dockerfile" for s in SERVICES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_every_copied_path_exists(dockerfile):
    copies = [args for word, args in instructions(dockerfile) if word in ("COPY", "ADD")]
    local = [args for args in copies if not args.startswith("--from")]
    assert local, "copies nothing from the build context"
    for args in local:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} — not in the repository"
    # Everything the package build needs is copied: the packages setuptools finds and the protos.
    copied = {shlex.split(a)[0].rstrip("/") for a in local}
    assert {"pyproject.toml", "protos", "unclip", "services"} <= copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_multi_stage_cpu_and_cuda_non_root(dockerfile):
    steps = instructions(dockerfile)
    froms = [args for word, args in steps if word == "FROM"]
    stage_names = {args.split(" AS ")[-1].strip() for args in froms if " AS " in args}
    assert {"base-cpu", "base-cuda", "build", "runtime"} <= stage_names
    assert any(a.startswith("nvidia/cuda:") for a in froms) and any(
        a.startswith("python:3.11") for a in froms
    )
    assert [a for w, a in steps if w == "ARG"][0] == "VARIANT=cpu"
    # The runtime stage takes only the built venv and app from the build stage.
    runtime = steps[[i for i, (w, a) in enumerate(steps) if w == "FROM" and a.endswith("AS runtime")][0] :]
    assert {a for w, a in runtime if w == "COPY"} == {
        "--from=build /opt/venv /opt/venv",
        "--from=build /app /app",
    }
    [user] = [a for w, a in runtime if w == "USER"]
    assert (
        user.split(":")[0].isdigit() and int(user.split(":")[0]) >= 1000
    )  # numeric: runAsNonRoot can verify


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_entrypoint_starts_and_ports_agree(dockerfile):
    steps = instructions(dockerfile)
    [entrypoint] = [a for w, a in steps if w == "ENTRYPOINT"]
    argv = json.loads(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2] == f"services.{dockerfile.stem}"
    module = argv[2]
    assert (ROOT / module.replace(".", "/") / "__main__.py").exists(), f"{module} has no __main__"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--port" in proc.stdout
    port = settings.DEFAULT_PORTS[dockerfile.stem]
    env_line = " ".join(a for w, a in steps if w == "ENV")
    assert f"UNCLIP_PORT={port}" in env_line
    [expose] = [a for w, a in steps if w == "EXPOSE"]
    assert expose.split() == [str(port), "9464"]


def test_manifests_use_only_images_built_here(rendered):
    """Every unclip image the overlays run has a Dockerfile (third-party images are pinned by tag)."""
    for overlay, docs in rendered.items():
        for doc in docs:
            if doc["kind"] not in ("Deployment", "Job"):
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                repository = c["image"].rsplit(":", 1)[0]
                if repository.startswith("unclip-"):
                    assert (ROOT / "docker" / f"{repository.removeprefix('unclip-')}.Dockerfile").exists(), (
                        overlay,
                        c["image"],
                    )
