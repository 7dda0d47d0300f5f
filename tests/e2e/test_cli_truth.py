"""The CLI tells a person the truth: the stack's own defaults and limits (`unclip info`), flags checked
against unclip.limits before any call, the subcommand's usage for an unknown flag, no picture overwritten
silently, one-line connection errors with the fix, a busy port named with a free one, no Python reprs, help
written for people. Through the shared stack (`stack.env`), as a person runs the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

UNCLIP = [sys.executable, "-m", "unclip"]
FAST = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2"]
NOWHERE = "127.0.0.1:1"  # nothing listens on port 1


def unclip(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*UNCLIP, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text and " object at 0x" not in text, text
    return lines[0]


def test_info_prints_the_stacks_capabilities(stack, tmp_path):
    done = unclip("info", cwd=tmp_path, env=stack.env)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert f"stack at {stack.address}" in text
    assert "32, 64, 128" in text  # the cascade's sizes
    assert "model name" in text and stack.model_dir.name in text
    assert "defaults for generate and vary" in text and "defaults for edit" in text
    assert "--decoder-guidance" in text and "--prior-steps" in text
    assert "1..10" in text and "2..1000" in text  # limits from unclip/limits.py, served by the stack

    done = unclip("info", "--json", cwd=tmp_path, env=stack.env)
    capabilities = json.loads(done.stdout)
    assert capabilities["sizes"] == [32, 64, 128]
    assert capabilities["model_name"] == stack.model_dir.name
    assert {limit["name"] for limit in capabilities["limits"]} >= {"n", "steps", "seed"}
    assert "vocabulary_words" not in capabilities  # this model ships no vocabulary: prompts are not checked


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["-n", "0"], "-n must be in 1..10"),
        (["-n", "11"], "-n must be in 1..10"),
        (["--prior-steps", "1"], "--prior-steps"),
    ],
)
def test_out_of_range_flags_are_refused_before_any_call(flags, named, tmp_path):
    done = unclip("generate", "a red circle", *flags, "--addr", NOWHERE, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert named in one_line(done.stderr)


def test_an_unknown_flag_shows_the_subcommands_usage(tmp_path):
    done = unclip("generate", "a red circle", "--steps", "10", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: unclip generate"), done.stderr
    assert "--steps" in done.stderr and "did you mean --prior-steps" in done.stderr


def test_the_same_seed_twice_keeps_both_pictures(stack, tmp_path):
    request = [
        "generate",
        "a red circle",
        "--seed",
        "7",
        "--size",
        "32",
        "--out",
        "out",
        "--no-progress",
        *FAST,
    ]
    first = unclip(*request, cwd=tmp_path, env=stack.env)
    second = unclip(*request, cwd=tmp_path, env=stack.env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split() == ["out/generate-7.png"]
    assert second.stdout.split() == ["out/generate-7_2.png"]
    # the same picture (the files differ in their provenance: request id, time, signature)
    pictures = [
        np.asarray(PIL.Image.open(tmp_path / f"out/{name}.png")) for name in ("generate-7", "generate-7_2")
    ]
    assert np.array_equal(*pictures)
    again = unclip(*request, "--overwrite", cwd=tmp_path, env=stack.env)
    assert again.stdout.split() == ["out/generate-7.png"]
    assert "warning:" not in first.stderr  # a model without a vocabulary file: no word is flagged


def test_connection_errors_are_one_line_with_the_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "UNCLIP_ADDR"}
    refused = unclip("generate", "a red circle", "--addr", NOWHERE, "--timeout", "5", cwd=tmp_path, env=env)
    assert refused.returncode == 1
    line = one_line(refused.stderr)
    assert f"no stack at {NOWHERE}" in line and "unclip up" in line

    url = unclip("generate", "a red circle", "--addr", "http://127.0.0.1:50051", cwd=tmp_path, env=env)
    assert url.returncode == 2
    assert "not a URL" in one_line(url.stderr) and "--addr 127.0.0.1:50051" in url.stderr

    waited = unclip(
        "generate", "a red circle", "--addr", NOWHERE, "--wait", "--timeout", "2", cwd=tmp_path, env=env
    )
    assert waited.returncode == 1
    line = one_line(waited.stderr)
    assert "no stack answered" in line and "--wait" in line and "unclip up" in line

    info = unclip("info", "--addr", NOWHERE, "--timeout", "2", cwd=tmp_path, env=env)
    assert info.returncode == 1 and f"no stack at {NOWHERE}" in one_line(info.stderr)


def test_up_on_a_busy_port_names_it_and_a_free_one(stack, tmp_path):
    port = stack.address.rsplit(":", 1)[1]
    done = unclip("up", "--model", str(stack.model_dir), "--port", port, cwd=tmp_path)
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert f"port {port} is in use" in line and "is free: unclip up --port" in line


def test_a_text_file_as_the_image_is_named_without_reprs(stack, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture\n")
    done = unclip("vary", "notes.txt", *FAST, cwd=tmp_path, env=stack.env)
    assert done.returncode == 2
    assert "image is not an image file" in one_line(done.stderr)


def test_audit_reads_the_running_stacks_log_by_itself(stack, tmp_path):
    """`unclip up` publishes its audit folder in the state file; `unclip audit` needs no --dir."""
    from unclip import stack_state

    unclip("generate", "a blue square", "--size", "32", "--out", "out", *FAST, cwd=tmp_path, env=stack.env)
    state_dir = tmp_path / "state"
    env = {**stack.env, "UNCLIP_STATE_DIR": str(state_dir)}
    env.pop("UNCLIP_AUDIT_DIR", None)
    missing = unclip("audit", cwd=tmp_path, env=env)
    assert missing.returncode == 2 and "unclip up" in one_line(missing.stderr)
    state = stack_state.StackState(
        address=stack.address, pid=os.getpid(), model=str(stack.model_dir), log_dir=str(stack.log_dir),
        audit_dir=str(stack.log_dir / "audit"),
    )  # fmt: skip
    state_dir.mkdir()
    (state_dir / stack_state.FILE_NAME).write_text(state.to_json())
    done = unclip("audit", "--stage", "prompt", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "allow" in done.stdout and "prompt" in done.stdout


def test_help_is_written_for_people(capsys, tmp_path):
    from unclip.cli import build_parser, main
    from unclip.cli_common import subcommand_parser

    parser = build_parser()
    for command in ("demo", "audit", "info", "make-tiny-model", "generate", "vary", "edit"):
        sub = subcommand_parser(parser, command)
        undocumented = [a.dest for a in sub._actions if not a.help]
        assert undocumented == [], (command, undocumented)
    generate = subcommand_parser(parser, "generate").format_help()
    assert "8.0" not in generate and "4.0" not in generate and "the stack's" in generate
    audit = subcommand_parser(parser, "audit").format_help()
    assert "examples:" in audit and "unclip audit --action block" in audit

    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 0
    assert "noise" in capsys.readouterr().err
