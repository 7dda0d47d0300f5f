"""`unclip up`: every stage as its own OS process on 127.0.0.1, plus the safety service and the orchestrator.

Each process listens on a free port (`--port 0`) and announces it on its first log line; the stack reads it,
waits until every process says SERVING, then reports the orchestrator's address. Stopping is orchestrator
first (it drains the requests in flight, which need the stages), then the rest; SIGKILL after the grace
period.

No orphans: every child gets PR_SET_PDEATHSIG(SIGTERM), so the kernel stops it even if `unclip up` itself is
SIGKILLed; children run in their own session so a terminal's Ctrl-C reaches only `unclip up`, which stops them
in order. A stage that fails to start stops the whole stack, naming the stage and quoting its log.

Access control is on by default (unclip.access): the stack mints a CA and a certificate per service (the
stages require one of this CA from a service allowed to call them, and serve health on a plaintext health-only
port), and a keys file with one key, `local`, that `channel()`, `client_env()` and the state file hand to
clients. `auth=False` / `tls=False` (`unclip up --no-auth` / `--no-tls`) turn either off.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unclip import stack_state
from unclip.runtime.server import health_status
from unclip.stack_process import (
    Process,
    compute_env,
    free_port_near,
    model_env,
    parse_replicas,
    port_in_use,
    sampling_defaults_env,
)

# What callers import from here (the processes' part lives in unclip.stack_process).
__all__ = [
    "InvalidModel",
    "Process",
    "Stack",
    "StackError",
    "access_summary",
    "busy_port_message",
    "compute_env",
    "parse_replicas",
    "run_until_signalled",
    "sampling_defaults_env",
]

LOCAL_KEY_NAME = "local"  # the key `unclip up` mints for its own user


class StackError(RuntimeError):
    """A process of the stack failed to start (the message names it and says why)."""


class InvalidModel(StackError):
    """The --model reference names no usable model folder (exit status 2)."""


@dataclass
class Stack:
    """The local stack: `start()` brings every process up, `stop()` takes them down (idempotent)."""

    model: str  # model folder in the Karlo layout
    port: int = 50051  # the orchestrator's port (0: a free one)
    log_dir: Path | None = None  # one log per process (default: a new temporary folder)
    safety_policy: str | None = None  # policy file for the safety service
    grace_seconds: float = 30.0  # how long in-flight calls get when stopping
    extra_env: dict[str, str] = field(default_factory=dict)
    # processes per stage ("decoder": 2, "super_res": 2, ...; see parse_replicas); 1 when absent
    replicas: dict[str, int] = field(default_factory=dict)
    interrupted: list[int] = field(default_factory=list)  # a signal arrived: abandon starting
    http_port: int | None = None  # the HTTP gateway's port (services.gateway; 0: any); None: no gateway
    test_signer: Any = None  # unclip.provenance.certs.TestSigner minted at start, when none was configured
    processes: list[Process] = field(default_factory=list)
    # log_dir was made by start() (a temporary folder): stop() removes it after a run that came up
    owns_log_dir: bool = False
    auth: bool = True  # API keys at the orchestrator (a keys file with one minted key, `local`)
    tls: bool = True  # mTLS between the services (a CA and certificates minted at start)
    access_dir: Path | None = (
        None  # keys file, the minted key, CA and certificates (mode 0700; removed at stop)
    )
    api_key: str | None = None  # the minted key (auth on)

    @property
    def address(self) -> str:
        orchestrator = next((p for p in self.processes if p.name == "orchestrator"), None)
        return (orchestrator.address or "") if orchestrator else ""

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Each process reads only its flags; variables meant for a single service must not leak into the
        # others.
        for name in ("UNCLIP_PORT", "UNCLIP_STAGE", "UNCLIP_HOST"):
            env.pop(name, None)
        env.update(self.extra_env)
        return env

    def _process(self, name: str, module: str, *args: str, port: int = 0) -> Process:
        # Metrics endpoints are off: the processes share one host, and a fixed port would clash.
        argv = [
            sys.executable,
            "-m",
            module,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
        ]
        argv += args
        assert self.log_dir is not None
        return Process(name=name, argv=argv, log_path=self.log_dir / f"{name.replace('#', '-')}.log")

    def start(self, timeout: float = 300.0) -> str:
        """Starts everything and waits until all say SERVING; returns the orchestrator's address.

        Raises StackError (after stopping whatever had started) when a process fails or the timeout passes.
        """
        from unclip.models import ModelLoadError, resolve_model_dir, upsampler_stages

        try:  # an s3:// model is fetched into the local cache once, here, not by every stage at once
            model_dir = resolve_model_dir(self.model)
        except ModelLoadError as error:
            raise InvalidModel(str(error)) from error
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="unclip-up-"))
            self.owns_log_dir = True
        self.log_dir.mkdir(parents=True, exist_ok=True)
        model = ["--model", str(model_dir)]
        upsamplers = upsampler_stages(model_dir)
        # (a count for an upsampler stage this model lacks, e.g. super_res_2, is ignored)

        def replicated(name: str, module: str, *args: str) -> list[Process]:
            count = self.replicas.get(name, 1)
            return [self._process(name if i == 0 else f"{name}#{i + 1}", module, *args) for i in range(count)]

        self._prepare_access()
        stages = [
            *replicated("encoder", "services.encoder", *model),
            *replicated("prior", "services.prior", *model),
            *replicated("decoder", "services.decoder", *model, "--stage", "decoder"),
            *[
                process
                for stage in upsamplers
                for process in replicated(stage, "services.decoder", *model, "--stage", stage)
            ],
            *replicated(
                "safety",
                "services.safety",
                "--audit-dir",
                str(self.log_dir / "audit"),
                *(["--policy", self.safety_policy] if self.safety_policy else []),
            ),
        ]
        for process in stages:
            process.argv += self._stage_access_args(process.name.split("#")[0])
            process.has_health_port = self.tls
        env = self._env()
        deadline = time.monotonic() + timeout
        try:
            for process in stages:
                self.processes.append(process)
                process.start(env)
            self._wait(stages, deadline, need_serving=False)  # every port known

            def targets(stage: str) -> str:  # every replica of a stage, "|"-separated
                return "|".join(p.address for p in stages if p.name.split("#")[0] == stage)

            orchestrator = self._process(
                "orchestrator",
                "services.orchestrator",
                *model,
                "--encoder-addr", targets("encoder"),
                "--prior-addr", targets("prior"),
                "--decoder-addr", targets("decoder"),
                "--upsampler-addrs", ",".join(targets(stage) for stage in upsamplers),
                "--safety-addr", targets("safety"),
                *self._orchestrator_access_args(),
                port=self.port,
            )  # fmt: skip
            self.processes.append(orchestrator)
            orchestrator.start(
                {
                    **sampling_defaults_env(self.model),
                    **model_env(self.model, model_dir),
                    **self._provenance_env(env),
                    **env,
                }
            )
            self._wait(self.processes, deadline, need_serving=True)
            if self.http_port is not None:
                self._start_gateway(orchestrator.address or "", Path(model_dir).name, env, deadline)
        except BaseException:
            self.stop(keep_logs=True)  # the error names a log: it stays
            raise
        return orchestrator.address or ""

    def _start_gateway(self, orchestrator: str, model: str, env: dict[str, str], deadline: float) -> None:
        """The HTTP door (services.gateway) in front of the running orchestrator."""
        assert self.log_dir is not None
        argv = [sys.executable, "-m", "services.gateway", "--port", str(self.http_port)]
        argv += ["--host", "127.0.0.1", "--metrics-port", "0", "--orchestrator-addr", orchestrator]
        argv += ["--model-name", model]
        gateway = Process(name="gateway", argv=argv, log_path=self.log_dir / "gateway.log")
        self.processes.append(gateway)
        gateway.start(env)
        self._wait([gateway], deadline, need_serving=False)  # ready once listening: its orchestrator is

    @property
    def http_url(self) -> str:
        """The gateway's base URL ('' without one)."""
        gateway = next((p for p in self.processes if p.name == "gateway"), None)
        return f"http://{gateway.address}" if gateway and gateway.address else ""

    def _provenance_env(self, env: dict[str, str]) -> dict[str, str]:
        """Without a configured C2PA signer: a TEST signer and watermark key minted for this stack (the
        caller's own settings still win: they are applied over this)."""
        if env.get("UNCLIP_C2PA_CERT") or env.get("UNCLIP_C2PA_KEY"):
            return {}
        from unclip.provenance.certs import mint_test_signer

        assert self.log_dir is not None
        self.test_signer = mint_test_signer(self.log_dir / "provenance")
        return self.test_signer.env()

    def restart(self, name: str, timeout: float = 120.0, wait: bool = True) -> None:
        """Starts the dead stage process `name` ("decoder#2") again on its ports and (with `wait`) waits until
        it serves. Call it from the thread that started the stack (see Process.restart)."""
        self._running(name).restart(self._env())
        if wait:
            self.wait_serving(name, timeout)

    def wait_serving(self, name: str, timeout: float = 120.0) -> None:
        """Blocks until the process `name` says SERVING (StackError if it dies or the timeout passes)."""
        self._wait([self._running(name)], time.monotonic() + timeout, need_serving=True)

    def _running(self, name: str) -> Process:
        """The process `name` of this stack ("decoder#2")."""
        return next(p for p in self.processes if p.name == name)

    def _wait(self, processes: list[Process], deadline: float, need_serving: bool) -> None:
        pending = list(processes)
        while pending:
            if self.interrupted:
                raise StackError("interrupted while starting")
            for process in list(pending):
                if not process.alive():
                    raise StackError(process.failure())
                address = process.poll_address()
                probe = process.probe_address
                if address and (not need_serving or health_status(probe, timeout=1.0) == "SERVING"):
                    pending.remove(process)
            if pending and time.monotonic() > deadline:
                what = "SERVING" if need_serving else "listening"
                names = ", ".join(f"{p.name} (log {p.log_path})" for p in pending)
                raise StackError(f"timed out waiting for {names} to be {what}")
            time.sleep(0.1)

    def state(self) -> stack_state.StackState:
        """What this stack is, for the state file (unclip.stack_state)."""
        assert self.log_dir is not None
        return stack_state.StackState(
            address=self.address,
            pid=os.getpid(),
            model=str(self.model),
            log_dir=str(self.log_dir),
            audit_dir=str(self.log_dir / "audit"),
            services=[
                stack_state.ServiceRecord(
                    p.name,
                    p.address or "",
                    p.popen.pid if p.popen else 0,
                    str(p.log_path),
                    p.health_address or "",
                )
                for p in self.processes
            ],
            extra={**self._access_extra(), **({"http_url": self.http_url} if self.http_url else {})},
        )

    def dead(self) -> list[Process]:
        """Processes that have exited (a running stack has none)."""
        return [p for p in self.processes if p.popen is not None and not p.alive()]

    def stop(self, keep_logs: bool = False) -> None:
        """SIGTERM the doors (gateway, orchestrator), then the rest; SIGKILL whatever outlives the grace
        period. Then removes the log folder if start() made it (a temporary one), unless `keep_logs`."""
        front = ("gateway", "orchestrator")  # the doors first: they drain requests that need the stages
        orchestrators = [p for p in self.processes if p.name in front]
        others = [p for p in self.processes if p.name not in front]
        for group in (orchestrators, others):
            for process in group:
                if process.alive():
                    process.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_seconds + 5
            for process in group:
                if process.popen is None:
                    continue
                try:
                    process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.popen.kill()
                    process.popen.wait()
        if self.owns_log_dir and not keep_logs and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.owns_log_dir = False
        if self.access_dir is not None:  # the keys and certificates of a stopped stack serve no one
            shutil.rmtree(self.access_dir, ignore_errors=True)

    # ---- access control (unclip.access) -------------------------------------------------------------------

    def _prepare_access(self) -> None:
        """Mints the CA, the certificates and the `local` key into a private folder."""
        if not (self.auth or self.tls) or self.access_dir is not None:
            return
        self.access_dir = Path(tempfile.mkdtemp(prefix="unclip-access-"))  # mode 0700
        if self.tls:
            from unclip.access.tls import mint_stack_certificates

            names = [
                "orchestrator",
                "encoder",
                "prior",
                "decoder",
                "super_res",
                "super_res_2",
                "safety",
                "client",
            ]
            mint_stack_certificates(self.access_dir / "tls", names)
        if self.auth:
            from unclip.access import keys

            self.api_key = keys.create(
                self.keys_file, LOCAL_KEY_NAME, tenant=LOCAL_KEY_NAME, scopes=list(keys.SCOPES)
            )
            key_file = self.access_dir / "api-key"
            key_file.touch(mode=0o600)
            key_file.write_text(self.api_key + "\n")

    @property
    def keys_file(self) -> Path:
        assert self.access_dir is not None
        return self.access_dir / "keys.yaml"

    def _cert(self, name: str, kind: str) -> str:
        assert self.access_dir is not None
        return str(self.access_dir / "tls" / (f"{name}.{kind}" if kind != "ca" else "ca.crt"))

    def _stage_access_args(self, name: str) -> list[str]:
        if not self.tls:
            return []
        args = ["--tls-cert", self._cert(name, "crt"), "--tls-key", self._cert(name, "key")]
        args += ["--client-ca", self._cert(name, "ca"), "--health-port", "0"]
        if name == "safety":  # its CLIP filter calls the encoder
            args += self._client_args("safety")
        return args

    def _client_args(self, name: str) -> list[str]:
        return [
            "--stage-tls-cert", self._cert(name, "crt"),
            "--stage-tls-key", self._cert(name, "key"),
            "--stage-tls-ca", self._cert(name, "ca"),
        ]  # fmt: skip

    def _orchestrator_access_args(self) -> list[str]:
        assert self.log_dir is not None
        args = ["--usage-dir", str(self.log_dir / "usage")]  # the usage ledger, beside the audit log
        args += self._client_args("orchestrator") if self.tls else []
        if self.auth:
            args += ["--keys-file", str(self.keys_file)]
        return args

    def _access_extra(self) -> dict[str, object]:
        assert self.log_dir is not None
        extra: dict[str, object] = {
            "auth": self.auth,
            "tls": self.tls,
            "usage_dir": str(self.log_dir / "usage"),
        }
        if self.auth:
            extra["keys_file"] = str(self.keys_file)
            extra["api_key_file"] = str(self.access_dir / "api-key") if self.access_dir else ""
        if self.tls:
            extra["ca_cert"] = self._cert("ca", "ca")
            extra["client_cert"] = self._cert("orchestrator", "crt")
            extra["client_key"] = self._cert("orchestrator", "key")
        return extra

    def channel(self, name: str = "orchestrator"):
        """A channel to a process of this stack ("orchestrator", "encoder", "decoder#2", ...) with the
        credentials it needs: the `local` key for the orchestrator; the orchestrator's client certificate
        for a stage (the stages admit it)."""
        from unclip.access.client import with_key
        from unclip.access.tls import channel_credentials
        from unclip.runtime.server import create_channel

        process = next(p for p in self.processes if p.name == name)
        if name == "orchestrator":
            return with_key(create_channel(process.address or ""), self.api_key)
        if not self.tls:
            return create_channel(process.address or "")
        credentials = channel_credentials(
            self._cert("ca", "ca"), self._cert("orchestrator", "crt"), self._cert("orchestrator", "key")
        )
        return create_channel(process.address or "", credentials=credentials)

    def client_env(self) -> dict[str, str]:
        """What a CLI subprocess needs in its environment to reach this stack's orchestrator."""
        env = {"UNCLIP_ADDR": self.address}
        if self.api_key:
            env["UNCLIP_API_KEY"] = self.api_key
        return env

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def busy_port_message(port: int) -> str:
    """One line: the port is taken, by what if we know it, and a free port to use instead."""
    running = stack_state.current()
    holder = (
        f"an `unclip up` (pid {running.pid}) already serves there"
        if running is not None and running.address.endswith(f":{port}")
        else "another program listens there"
    )
    free = free_port_near(port)
    return f"port {port} is in use: {holder}; port {free} is free: unclip up --port {free} ..."


def access_summary(stack: Stack) -> str:
    """One line on what protects the stack (also logged when it is off)."""
    auth = (
        f"API keys ON (keys file {stack.keys_file}; the CLI finds the `local` key through the state file)"
        if stack.auth
        else "API keys OFF (--no-auth): anyone who can reach the orchestrator may call it"
    )
    tls = "mTLS between services ON" if stack.tls else "mTLS between services OFF (--no-tls)"
    return f"{auth}; {tls}"


def run_until_signalled(stack: Stack, timeout: float = 300.0) -> int:
    """`unclip up`: start, print the addresses, wait for Ctrl-C / SIGTERM (or a process dying), stop
    everything."""
    stopping = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)
        stack.interrupted.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if stack.port and port_in_use(stack.port):
        print(f"unclip up: {busy_port_message(stack.port)}", file=sys.stderr, flush=True)
        return 1
    try:
        address = stack.start(timeout=timeout)
    except StackError as error:
        print(f"unclip up: {error}", file=sys.stderr, flush=True)
        return 2 if isinstance(error, InvalidModel) else 1
    for process in stack.processes:
        print(f"  {process.name:<13} {process.address}   log {process.log_path}", flush=True)
    print(f"  access        {access_summary(stack)}", flush=True)
    state_path = stack_state.publish(stack.state())
    print(f"  audit log     {stack.log_dir / 'audit'}", flush=True)
    if stack.test_signer is not None:
        print(f"  provenance    C2PA signer and watermark key FOR TESTING ONLY, minted in "
              f"{stack.test_signer.cert.parent} (not trusted outside this machine)", flush=True)  # fmt: skip
    print(f"  stack state   {state_path} (also {stack.log_dir / stack_state.FILE_NAME})", flush=True)
    if stack.owns_log_dir:
        print("  (logs and audit log are in a temporary folder, removed on exit; --log-dir D keeps them)")
    if stack.http_url:
        print(f"HTTP (OpenAI Images API, playground) on {stack.http_url}", flush=True)
    print(f"orchestrator listening on {address}", flush=True)
    status = 0
    while not stopping:
        dead = stack.dead()
        if dead:
            print(
                f"unclip up: {dead[0].name} exited (status {dead[0].popen.returncode}); stopping",
                file=sys.stderr,
            )
            print(dead[0].log_tail(), file=sys.stderr, flush=True)
            status = 1
            break
        time.sleep(0.2)
    print("unclip up: stopping", flush=True)
    stack_state.withdraw()
    stack.stop()
    return status
