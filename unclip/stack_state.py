"""The local stack's state file: what `unclip up` started, where the CLI, `unclip audit` and `unclip usage`
find it without flags.

`unclip up` writes it once every process is SERVING, to the state folder (`UNCLIP_STATE_DIR`, default
`$XDG_STATE_HOME/unclip`, else `~/.local/state/unclip`) as `stack.json`, and as `stack.json` inside its log
folder; it removes the first on exit (the copy in the log folder stays, as a record of the run). Readers use
`current()`, which ignores a file whose `unclip up` process is gone (a killed stack leaves a stale file).

Like a kubeconfig: one file per user, the newest local stack wins. Anything a later part of the stack needs
to publish (a key file, a CA, an HTTP URL) goes into `extra`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unclip.runtime.settings import SETTINGS, env_default, env_is_set

FILE_NAME = "stack.json"
VERSION = 1


@dataclass
class ServiceRecord:
    name: str  # "encoder", "prior", "decoder", "super_res", "safety", "orchestrator", "decoder#2", ...
    address: str  # host:port it serves on
    pid: int  # its process id
    log: str  # path of its log file
    health_address: str = ""  # its plaintext health-only port (a stage behind mTLS), else ""


@dataclass
class StackState:
    address: str  # the orchestrator's host:port (the CLI's default --addr)
    pid: int  # the `unclip up` process
    model: str  # the model folder it serves
    log_dir: str  # one log per process
    audit_dir: str  # the safety service's audit log (what `unclip audit` reads)
    services: list[ServiceRecord] = field(default_factory=list)
    # e.g. "api_key_file", "keys_file", "ca_cert", "client_cert", "client_key", "auth", "tls", "http_url"
    extra: dict[str, object] = field(default_factory=dict)
    version: int = VERSION

    def folder(self, name: str) -> str:
        """A folder it publishes ("audit_dir", or one in `extra` such as "usage_dir"), or ""."""
        return str(getattr(self, name, "") or self.extra.get(name) or "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StackState:
        data = json.loads(text)
        services = [ServiceRecord(**record) for record in data.pop("services", [])]
        return cls(services=services, **data)


def state_dir() -> Path:
    """Where the current local stack's state file lives (not created here)."""
    configured = env_default("state_dir")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "unclip"


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)  # readers never see half a file


def publish(state: StackState) -> Path:
    """Writes the state to the state folder and into its log folder; returns the state folder's file."""
    _write_atomically(Path(state.log_dir) / FILE_NAME, state.to_json())
    path = state_dir() / FILE_NAME
    _write_atomically(path, state.to_json())
    return path


def withdraw(pid: int | None = None) -> None:
    """Removes the state folder's file if it belongs to `pid` (default: this process)."""
    path = state_dir() / FILE_NAME
    state = read(path)
    if state is not None and state.pid == (pid or os.getpid()):
        path.unlink(missing_ok=True)


def read(path: Path) -> StackState | None:
    """The state in `path`, or None when it is missing or unreadable."""
    try:
        return StackState.from_json(path.read_text())
    except (OSError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def current() -> StackState | None:
    """The running local stack's state, or None when no `unclip up` of this user is running."""
    state = read(state_dir() / FILE_NAME)
    if state is None or not _alive(state.pid):
        return None
    return state


def find_path(flag: str | None, setting: str, flag_name: str = "--dir") -> tuple[Path | None, str]:
    """The folder or file a command reads (`unclip audit`'s log, `unclip usage`'s ledger, `unclip keys`' file)
    and where that choice came from: `flag`, else the setting's environment variable, else the running local
    stack's, else None. The environment wins when set at all, even to the default: a person who set it meant
    that path."""
    if flag:
        return Path(flag), flag_name
    if env_is_set(setting):
        return Path(env_default(setting)), SETTINGS[setting].env
    running = current()
    if running is None:
        return None, "no local `unclip up` is running"
    if not running.folder(setting):
        return None, f"the running `unclip up` (pid {running.pid}) publishes none"
    return Path(running.folder(setting)), f"the running `unclip up` (pid {running.pid})"
