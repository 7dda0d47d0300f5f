"""The processes of the local stack (unclip.stack): how one is spawned and watched (`Process`: its own
session, its log, the address it announces, death with its parent), and what each is started with: the
orchestrator's environment from the model folder (sampling defaults, name, vocabulary), the stages' compute
options, the replicas per stage, and the ports (`port_in_use`, `free_port_near`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_HEALTH_ONLY = re.compile(r"health-only port on (\S+):(\d+)")


# Each child asks the kernel for SIGTERM when this process dies (unclip.runtime.server.die_with_parent, told
# our pid through PARENT_PID_ENV), after its exec. Not in a preexec_fn: that forces fork() in this threaded,
# gRPC-using process, and gRPC's fork handlers can crash the child before its exec (grpc/grpc#43055,
# "epoll_wait error: Bad file descriptor", SIGABRT); without one, Popen may vfork and runs no fork handlers.
PARENT_PID_ENV = "UNCLIP_PARENT_PID"


@dataclass
class Process:
    name: str  # "encoder", "prior", "decoder", "super_res", "super_res_2", "safety", "orchestrator"
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen | None = None
    address: str | None = None  # "127.0.0.1:port" once announced
    health_address: str | None = None  # its plaintext health-only port, when it has one
    has_health_port: bool = False  # whether to wait for the health-only port's announcement

    def start(self, env: dict[str, str]) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child owns it from here)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, PARENT_PID_ENV: str(os.getpid())},
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def restart(self, env: dict[str, str]) -> None:
        """Starts the (dead) process again on the ports it had announced, as a Deployment replaces a killed
        pod behind the same Service address; its log goes on in a new file beside the first. Call it from a
        thread that lives as long as the stack: the child's parent-death signal follows the thread that
        started it, not the process."""
        assert not self.alive(), f"{self.name} is still running"
        for flag, address in (("--port", self.address), ("--health-port", self.health_address)):
            if address and flag in self.argv:
                self.argv[self.argv.index(flag) + 1] = address.rsplit(":", 1)[1]
        self.log_path = self.log_path.with_name(self.log_path.stem + "-restarted.log")
        self.start(env)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def poll_address(self) -> str | None:
        """The address once announced (and, with a health-only port, once that is announced too)."""
        if self.address is None or (self.has_health_port and self.health_address is None):
            try:
                text = self.log_path.read_text(errors="replace")
            except OSError:
                text = ""
            self.address = self.address or _address(_LISTENING.search(text))
            self.health_address = self.health_address or _address(_HEALTH_ONLY.search(text))
        if self.has_health_port and self.health_address is None:
            return None
        return self.address

    @property
    def probe_address(self) -> str | None:
        """Where a plaintext health check reaches it."""
        return self.health_address or self.address

    def failure(self) -> str:
        code = self.popen.returncode if self.popen else None
        return (
            f"{self.name} exited with status {code} before it was ready; its log ({self.log_path}) ends:\n"
            + (self.log_tail())
        )


def _address(match: re.Match | None) -> str | None:
    if not match:
        return None
    host = "127.0.0.1" if match.group(1) in ("0.0.0.0", "[::]") else match.group(1)
    return f"{host}:{match.group(2)}"


# What a model folder may recommend for sampling (beside the Karlo folders), and the orchestrator's variable.
SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"
SAMPLING_DEFAULTS_ENV = {
    "prior_guidance_scale": "UNCLIP_PRIOR_GUIDANCE_SCALE",
    "decoder_guidance_scale": "UNCLIP_DECODER_GUIDANCE_SCALE",
    "edit_decoder_guidance_scale": "UNCLIP_EDIT_DECODER_GUIDANCE_SCALE",
    "prior_num_inference_steps": "UNCLIP_PRIOR_STEPS",
    "decoder_num_inference_steps": "UNCLIP_DECODER_STEPS",
    "super_res_num_inference_steps": "UNCLIP_SUPER_RES_STEPS",
    "prior_sampler": "UNCLIP_PRIOR_SAMPLER",
    "decoder_sampler": "UNCLIP_DECODER_SAMPLER",
    "super_res_sampler": "UNCLIP_SUPER_RES_SAMPLER",
    "ddim_eta": "UNCLIP_DDIM_ETA",
}


def sampling_defaults_env(model: str) -> dict[str, str]:
    """A local model folder's sampling_defaults.json as the orchestrator's environment (the caller's own
    environment still wins: it is applied over this). An unknown key is an error, not silently ignored."""
    path = Path(model) / SAMPLING_DEFAULTS_FILE
    if not path.is_file():
        return {}
    values = json.loads(path.read_text())
    unknown = sorted(set(values) - set(SAMPLING_DEFAULTS_ENV))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(SAMPLING_DEFAULTS_ENV)}")
    return {SAMPLING_DEFAULTS_ENV[key]: str(value) for key, value in values.items()}


# `unclip up` flags that set a model stage's compute option (unclip.models._tune_unet reads the variable when
# the stage loads its UNets); None leaves the variable as the caller's environment has it.
COMPUTE_OPTION_ENV = {"channels_last": "UNCLIP_CHANNELS_LAST", "compile": "UNCLIP_COMPILE"}


def compute_env(**options: bool | None) -> dict[str, str]:
    """`compute_env(channels_last=True, compile=None)` -> {"UNCLIP_CHANNELS_LAST": "1"}: the stage
    processes' environment for the compute options given (Stack.extra_env)."""
    unknown = sorted(set(options) - set(COMPUTE_OPTION_ENV))
    if unknown:
        raise ValueError(f"unknown compute options {unknown}; known: {sorted(COMPUTE_OPTION_ENV)}")
    return {COMPUTE_OPTION_ENV[name]: "1" if on else "0" for name, on in options.items() if on is not None}


def parse_replicas(value: str) -> dict[str, int]:
    """`decoder=2,upsampler=2` -> {"decoder": 2, "super_res": 2, "super_res_2": 2}: "upsampler" stands for
    every upsampler stage. ValueError naming the bad part."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, _, number = part.partition("=")
        name = name.strip()
        if name not in ("encoder", "prior", "decoder", "upsampler", "super_res", "super_res_2", "safety"):
            raise ValueError(f"replicas: unknown stage {name!r} in {part!r}")
        try:
            count = int(number)
        except ValueError:
            raise ValueError(f"replicas: {part!r} must be STAGE=N") from None
        if not 1 <= count <= 8:
            raise ValueError(f"replicas: {name} must have 1..8 replicas, got {count}")
        if name == "upsampler":
            counts.setdefault("super_res", count)
            counts.setdefault("super_res_2", count)
        else:
            counts[name] = count
    return counts


def model_env(model: str, model_dir: Path) -> dict[str, str]:
    """The orchestrator's model settings from the model reference: its name (the folder's, or the last part
    of an s3:// prefix) and, if the folder ships one, its vocabulary file (unclip.vocabulary)."""
    from unclip.vocabulary import FILE_NAME

    env = {"UNCLIP_MODEL_NAME": model.rstrip("/").rsplit("/", 1)[-1]}
    if (Path(model_dir) / FILE_NAME).is_file():
        env["UNCLIP_VOCABULARY"] = str(Path(model_dir) / FILE_NAME)
    return env


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when `host:port` cannot be bound because something listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def free_port_near(port: int) -> int:
    """The first free port after `port` (within 100), else any free port."""
    for candidate in range(port + 1, min(port + 100, 65536)):
        if not port_in_use(candidate):
            return candidate
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
