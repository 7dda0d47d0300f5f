"""README.md's shell blocks, run as a person pastes them: the block with `unclip up` in one shell (in the
background here), every other block in a second shell with `bash -e`, from a folder laid out like the
repository.

Skipped by name, and only these: the `make` targets (`make demo` and `make install` install and run the
bundled model for minutes; `make test` is this suite; `make toy-model` trains for hours).

One stand-in, so the test fits in `make test`: `models/shapes-toy` in the working folder is a tiny random
model with the bundled model's vocabulary.txt and sampling_defaults.json (the same sizes, 32 -> 64 -> 128 px);
the bundled weights take minutes to start and sample on 2 cores (tests/training/test_shipped_model.py covers
them). `unclip up` gets UNCLIP_PORT=0 (a free port: a person's own stack may hold 50051) and UNCLIP_STATE_DIR
(its state file stays in the test's folder), so the client commands find it the way the README says: by
themselves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BUNDLED = ROOT / "models" / "shapes-toy"

# Lines that cannot run inside `make test`, by name, and why.
SKIP = {
    "make demo": "installs, then starts the bundled model and samples for minutes",
    "make test": "this suite",
    "make install": "installs into the shared .venv",
    "make toy-model": "trains the bundled model for hours",
}


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def runnable(block: str) -> str:
    """The block without the lines skipped by name (each checked to be named in SKIP)."""
    kept = []
    for line in block.splitlines():
        command = line.split("#", 1)[0].strip()
        if command.startswith("make "):
            assert command in SKIP, f"README runs `{command}`: run it here or add it to SKIP with a reason"
            continue
        kept.append(line)
    return "\n".join(kept)


def stand_in_model(tiny: Path, folder: Path) -> Path:
    """A tiny random model with the bundled model's small files (vocabulary, sampling defaults)."""
    folder.mkdir(parents=True)
    for entry in tiny.iterdir():
        (folder / entry.name).symlink_to(entry)
    for name in ("vocabulary.txt", "sampling_defaults.json"):
        (folder / name).write_bytes((BUNDLED / name).read_bytes())
    return folder


@pytest.fixture
def workdir(stack_model_dir, tmp_path) -> Path:
    """A folder laid out like the repository: .venv and examples/ from it, models/shapes-toy a stand-in."""
    work = tmp_path / "clone"
    work.mkdir()
    for name in (".venv", "examples"):
        (work / name).symlink_to(ROOT / name)
    stand_in_model(stack_model_dir, work / "models" / "shapes-toy")
    return work


def wait_for_listening(process: subprocess.Popen, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("orchestrator listening on "):
            return lines
    raise AssertionError("unclip up did not come up:\n" + "".join(lines) + process.stderr.read())


def test_readme_commands_run_as_written(workdir, tmp_path):
    blocks = [runnable(block) for block in shell_blocks(README.read_text())]
    server = [block for block in blocks if re.search(r"^unclip up\b", block, flags=re.M)]
    clients = [block for block in blocks if block.strip() and block not in server]
    assert len(server) == 1 and clients, blocks

    env = {k: v for k, v in os.environ.items() if not k.startswith("UNCLIP_")}
    env.update(
        PYTHONPATH=str(ROOT),  # this checkout's code, whatever the venv was installed from
        UNCLIP_STATE_DIR=str(tmp_path / "state"),
        UNCLIP_PORT="0",
        PATH=os.defpath,  # `unclip` is on PATH only once the README's `source .venv/bin/activate` ran
    )
    up = subprocess.Popen(
        ["bash", "-e", "-c", server[0]], cwd=workdir, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        printed = "".join(wait_for_listening(up, timeout=300))
        assert "audit log" in printed and "stack state" in printed, printed
        state = json.loads((tmp_path / "state" / "stack.json").read_text())

        outputs = []
        for block in clients:
            done = subprocess.run(
                ["bash", "-e", "-x", "-c", block], cwd=workdir, env=env, capture_output=True, text=True,
                timeout=300,
            )  # fmt: skip
            assert done.returncode == 0, f"README block failed:\n{block}\n---\n{done.stdout}\n{done.stderr}"
            outputs.append(done.stdout + done.stderr)
        said = "\n".join(outputs)

        # What the README says these commands do.
        out = workdir / "out"
        assert {f"generate-{seed}.png" for seed in (7, 8, 9, 10)} <= {p.name for p in out.iterdir()}
        assert (out / "vary-1.png").is_file() and (out / "edit-3.png").is_file()
        assert 'the model does not know the words "pink", "hexagon"' in said
        assert "model name" in said and "shapes-toy" in said  # unclip info
        assert "allow" in said and "final_output" in said  # unclip audit, from the running stack's log
    finally:
        os.killpg(up.pid, signal.SIGTERM)  # Ctrl-C in the first shell
        up.wait(timeout=120)
    # Stopped: its temporary log folder is removed and its state file withdrawn.
    assert not Path(state["log_dir"]).exists()
    assert not (tmp_path / "state" / "stack.json").exists()
