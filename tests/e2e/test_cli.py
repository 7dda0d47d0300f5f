"""`unclip up` + `unclip generate/vary/edit` from a shell, exactly as the README documents them; stopping the
stack leaves no process behind, also when a stage fails to start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

UNCLIP = [sys.executable, "-m", "unclip"]  # the console script `unclip`, from this test's environment
FAST = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2"]

POLICY = """\
version: e2e-test
categories:
  violence: {threshold: 0.5, action: block}
filters:
  words:
    type: blocklist
    terms:
      violence: [zorblax]
stages:
  prompt: [words]
"""


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes (not zombies) that mention `text`, other than this one."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def wait_for_address(process: subprocess.Popen, timeout: float = 300) -> tuple[str, list[str]]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("orchestrator listening on "):
            return line.split()[-1], lines
    raise AssertionError(f"unclip up did not come up: {''.join(lines)}{process.stderr.read()}")


def unclip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*UNCLIP, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_up_generate_vary_edit_then_stop(stack_model_dir, tmp_path):
    model = tmp_path / "model"
    model.symlink_to(stack_model_dir)  # a path only this stack's processes mention
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    up = subprocess.Popen(
        [*UNCLIP, "up", "--model", str(model), "--port", "0", "--log-dir", str(tmp_path / "logs"),
         "--safety-policy", str(policy)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        address, printed = wait_for_address(up)
        assert len(processes_mentioning(str(tmp_path))) >= 7  # unclip up + 6 services
        # The stack it started, for operators and the CLI: every service's name, address and pid.
        state = json.loads((tmp_path / "logs" / "stack.json").read_text())
        published = Path(os.environ["UNCLIP_STATE_DIR"]) / "stack.json"
        assert json.loads(published.read_text()) == state and state["address"] == address
        names = {s["name"] for s in state["services"]}
        assert names == {"encoder", "prior", "decoder", "super_res", "super_res_2", "safety", "orchestrator"}
        assert all(Path(f"/proc/{s['pid']}").exists() and s["address"] for s in state["services"])
        addr = ["--addr", address]

        # generate: writes PNGs, prints their paths.
        done = unclip("generate", "a red circle", "-n", "2", "--size", "64", "--seed", "3", "--out", "out",
                      *addr, *FAST, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
        paths = [tmp_path / line for line in done.stdout.split()]
        assert [p.name for p in paths] == ["generate-3.png", "generate-4.png"]
        assert all(PIL.Image.open(p).size == (64, 64) for p in paths)
        assert "seed 3" in done.stderr

        # vary: variations of one of them, at the cascade's largest size by default.
        done = unclip("vary", str(paths[0]), "--seed", "5", "--out", "out", *addr, *FAST, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert PIL.Image.open(tmp_path / done.stdout.split()[0]).size == (128, 128)

        # edit: regenerate the transparent square of the mask.
        original = np.asarray(PIL.Image.open(paths[0]).convert("RGB"))
        alpha = np.full((64, 64), 255, dtype=np.uint8)
        alpha[16:48, 16:48] = 0
        PIL.Image.fromarray(np.dstack([original, alpha]), "RGBA").save(tmp_path / "mask.png")
        edit = ["edit", str(paths[0]), "a blue square", "--mask", "mask.png", "--size", "64", "--seed", "1"]
        done = unclip(*edit, "--out", "out", *addr, *FAST, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        edited = np.asarray(PIL.Image.open(tmp_path / done.stdout.split()[0]).convert("RGB")).astype(int)
        keep = alpha > 0
        assert np.abs(edited - original)[keep].max() <= 2
        assert np.abs(edited - original)[~keep].mean() > 10

        # Exit codes: 2 invalid input naming the field, 3 refused by the policy naming the check, 1 anything
        # else.
        done = unclip("generate", "", *addr, cwd=tmp_path)
        assert done.returncode == 2 and "prompt" in done.stderr, done.stderr
        done = unclip("generate", "a red circle", "--size", "4096", *addr, cwd=tmp_path)
        assert done.returncode == 2 and "size" in done.stderr and "32, 64, 128" in done.stderr, done.stderr
        done = unclip("edit", str(paths[0]), "a blue square", *addr, cwd=tmp_path)
        assert done.returncode == 2 and "mask" in done.stderr, done.stderr
        done = unclip("vary", "missing.png", *addr, cwd=tmp_path)
        assert done.returncode == 2 and "image" in done.stderr, done.stderr
        done = unclip("generate", "a zorblax on a hill", *addr, *FAST, cwd=tmp_path)
        assert done.returncode == 3 and "prompt" in done.stderr and "violence" in done.stderr, done.stderr
        done = unclip("generate", "a red circle", "--addr", "127.0.0.1:1", "--timeout", "5", cwd=tmp_path)
        assert done.returncode == 1, done.stderr

        # SIGTERM (as Ctrl-C / a service manager would): everything stops, nothing is left behind.
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=120) == 0
        assert processes_mentioning(str(tmp_path)) == []
        assert not published.exists()  # withdrawn: no stack is running
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_up_names_the_stage_that_fails_and_leaves_nothing(stack_model_dir, tmp_path):
    model = tmp_path / "broken-model"
    shutil.copytree(stack_model_dir, model)
    for weights in (model / "decoder").glob("*.safetensors"):  # only the decoder reads these
        weights.write_bytes(b"not a safetensors file")
    up = subprocess.run(
        [*UNCLIP, "up", "--model", str(model), "--port", "0", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert up.returncode == 1
    assert "decoder exited" in up.stderr and "failed to start" in up.stderr, up.stderr
    assert processes_mentioning(str(tmp_path)) == []


def test_up_with_a_missing_model_says_so(tmp_path):
    done = unclip("up", "--model", str(tmp_path / "nowhere"), "--port", "0", cwd=tmp_path)
    assert done.returncode == 2 and "nowhere" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args", [["generate", "x", "--seed", "-1"], ["generate", "x", "--super-res-steps", "a"]]
)
def test_cli_rejects_bad_flags_before_calling(args, tmp_path):
    done = unclip(*args, "--addr", "127.0.0.1:1", cwd=tmp_path)
    assert done.returncode == 2
    assert ("seed" if "--seed" in args else "super-res-steps") in done.stderr
