"""`unclip up --channels-last / --compile`: the decoder's and upsamplers' UNet compute options as flags.

The flags set UNCLIP_CHANNELS_LAST / UNCLIP_COMPILE for the stage processes, which read them when they load
their UNets (unclip.models._tune_unet); each stage logs what its UNets now *are* (the weights' memory
format, whether the module is compiled) and the precision each module was loaded in (UNCLIP_DTYPE, default
auto), so the check reads the real stage processes' own logs after a real `unclip up`, and generates an image
through the flagged stack.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import PIL.Image

UNCLIP = [sys.executable, "-m", "unclip"]
FAST = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2"]
OPTIONS = re.compile(r"compute options: (\w+) channels_last=(True|False) compile=(True|False)")
WEIGHTS = re.compile(r"weights: (\w+) dtype=(\w+)")


def start_up(model: Path, log_dir: Path, *flags: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    up = subprocess.Popen(
        [*UNCLIP, "up", "--model", str(model), "--port", "0", "--log-dir", str(log_dir), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines = []
    for line in up.stdout:
        lines.append(line)
        if line.startswith("orchestrator listening on "):
            return up, line.split()[-1]
    stop(up)  # stdout closed without the address: unclip up failed (or is failing); leave nothing behind
    raise AssertionError(f"unclip up did not come up: {''.join(lines)}{up.stderr.read()}")


def stop(up: subprocess.Popen) -> None:
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def logged_options(log: Path) -> list[tuple[str, bool, bool]]:
    """(UNet class, channels_last, compile) for every UNet the stage process loaded, from its own log."""
    return [(m[0], m[1] == "True", m[2] == "True") for m in OPTIONS.findall(log.read_text(errors="replace"))]


def logged_dtypes(log: Path) -> set[str]:
    """The precisions the stage process's modules were loaded in, from its own log."""
    return {m[1] for m in WEIGHTS.findall(log.read_text(errors="replace"))}


def native_bfloat16() -> bool:
    """From the kernel's CPU flags, not torch's probes: AVX512-BF16 or AMX (x86)."""
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def test_up_help_documents_the_compute_flags():
    done = subprocess.run([*UNCLIP, "up", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for flag in ("--channels-last", "--no-channels-last", "--compile", "--no-compile"):
        assert flag in text
    assert "UNCLIP_CHANNELS_LAST" in text and "UNCLIP_COMPILE" in text and "not bit-exact" in text


def test_compute_flags_reach_the_stage_processes(tmp_path):
    from unclip.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "model", variation=False)
    env = dict(os.environ)
    env.pop("UNCLIP_CHANNELS_LAST", None)
    env.pop("UNCLIP_DTYPE", None)  # the default, auto: bfloat16 where this CPU multiplies it natively
    env["UNCLIP_COMPILE"] = "1"  # the flag must win over the environment (else start-up compiles for minutes)

    up, address = start_up(model, tmp_path / "logs", "--channels-last", "--no-compile", env=env)
    try:
        decoder = logged_options(tmp_path / "logs" / "decoder.log")
        super_res = logged_options(tmp_path / "logs" / "super_res.log")
        assert decoder == [("UNet2DConditionModel", True, False)], decoder
        assert super_res == [("UNet2DModel", True, False)] * 2, super_res  # super_res_first and _last
        for other in ("encoder", "prior", "orchestrator"):  # no UNet there: nothing to tune
            assert logged_options(tmp_path / "logs" / f"{other}.log") == []
        auto = "bfloat16" if native_bfloat16() else "float32"
        for stage in ("encoder", "prior", "decoder", "super_res"):
            assert logged_dtypes(tmp_path / "logs" / f"{stage}.log") == {auto}, stage

        # The channels-last stack answers as any other.
        done = subprocess.run(
            [*UNCLIP, "generate", "a red circle", "--seed", "1", "--out", "out", "--addr", address, *FAST],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert PIL.Image.open(tmp_path / done.stdout.split()[0]).size == (64, 64)
    finally:
        stop(up)
    assert up.returncode == 0

    # Off by flag although the environment says on; float32 where the environment says so.
    env["UNCLIP_CHANNELS_LAST"] = "1"
    env["UNCLIP_DTYPE"] = "float32"
    up, _ = start_up(model, tmp_path / "logs-off", "--no-channels-last", "--no-compile", env=env)
    try:
        off = tmp_path / "logs-off"
        assert logged_options(off / "decoder.log") == [("UNet2DConditionModel", False, False)]
        assert logged_options(off / "super_res.log") == [("UNet2DModel", False, False)] * 2
        for stage in ("encoder", "prior", "decoder", "super_res"):
            assert logged_dtypes(off / f"{stage}.log") == {"float32"}, stage
    finally:
        stop(up)


def test_compile_option_wraps_and_reports_the_unet(monkeypatch, caplog):
    """UNCLIP_COMPILE (what `--compile` sets) compiles the UNet; the log line says so. Not run through a
    stack: its warm-up would compile for minutes on this CPU."""
    import torch
    from diffusers import UNet2DModel

    from unclip.models import _tune_unet

    monkeypatch.setenv("UNCLIP_COMPILE", "1")
    monkeypatch.setenv("UNCLIP_CHANNELS_LAST", "0")
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with caplog.at_level(logging.INFO, logger="unclip.models"):
        tuned = _tune_unet(unet)
    assert isinstance(tuned, torch.nn.Module) and tuned._orig_mod is unet
    assert "compute options: UNet2DModel channels_last=False compile=True" in caplog.text
