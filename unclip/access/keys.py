"""API keys and the keys file.

A key is 32 random bytes (256 bits) shown once as `uk_<base64url>`; the file keeps only its SHA-256 (a fast
hash is enough for a high-entropy secret: there is nothing to brute-force). The file (YAML or JSON; in
Kubernetes a Secret mounted as a file) lists the callers:

    keys:                           # API keys (authorization: Bearer <key>)
      - name: ci-bot                # unique; what audit records, metrics and the usage ledger name
        tenant: team-a              # who is charged; quotas also apply per tenant
        sha256: 9f86d0...           # hex SHA-256 of the key
        scopes: [generate, vary]    # generate, vary, edit, admin (admin: everything)
        priority: batch             # interactive | batch
        images_per_minute: 60       # token bucket; 0 = no limit
        max_concurrent: 4           # requests in progress; 0 = no limit
        revoked: false              # `unclip keys revoke` sets it (the record stays, for the audit trail)
    clients:                        # client certificates at the front door (mTLS), by subject (SAN or CN)
      - subject: reporting.team-b.svc
        tenant: team-b
        scopes: [generate]
    tenants:                        # optional limits shared by every key of a tenant
      team-a: {images_per_minute: 600, max_concurrent: 16}

`KeyStore` answers lookups from memory and re-reads the file when its stat (mtime, size, inode) changes,
checked at most every `check_interval_s` on the lookup path: a revoked key is refused within that interval,
with no restart and no watcher thread. A file that fails to parse keeps the last good table (logged): a
half-edited file must not open the door, nor lock every caller out.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SCOPES = ("generate", "vary", "edit", "admin")
PRIORITIES = ("interactive", "batch")
KEY_PREFIX = "uk_"
KEY_BYTES = 32  # 256 bits


class KeysFileError(ValueError):
    """The keys file is malformed (the message names the entry and field)."""


@dataclass(frozen=True)
class Limits:
    images_per_minute: int = 0  # token bucket refill per minute (burst = one minute's worth); 0 = unlimited
    max_concurrent: int = 0  # requests in progress at once; 0 = unlimited


@dataclass(frozen=True)
class Identity:
    """An authenticated caller. `principal` is what audit records and the ledger name."""

    name: str  # key name, or the certificate subject
    tenant: str  # who is charged
    scopes: frozenset[str] = frozenset(SCOPES)  # what it may call
    priority: str = "interactive"  # its priority class (a request may only lower it)
    limits: Limits = Limits()  # per-key quotas
    kind: str = "key"  # "key", "cert" or "anonymous" (authentication off)

    @property
    def principal(self) -> str:
        return f"{self.kind}:{self.name}"

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


ANONYMOUS = Identity(name="anonymous", tenant="anonymous", kind="anonymous")


@dataclass
class KeyRecord:
    name: str  # unique within the file
    tenant: str  # who is charged
    sha256: str = ""  # hex digest of the key (keys:) ; empty for certificate clients
    subject: str = ""  # certificate subject (clients:)
    scopes: list[str] = field(default_factory=lambda: ["generate", "vary", "edit"])
    priority: str = "interactive"
    images_per_minute: int = 0
    max_concurrent: int = 0
    revoked: bool = False
    created: str = ""  # ISO time the key was minted (informational)

    def identity(self, kind: str) -> Identity:
        return Identity(
            # A certificate client is known by the subject its certificate proves, a key by its name.
            name=self.subject if kind == "cert" and self.subject else self.name,
            tenant=self.tenant,
            scopes=frozenset(self.scopes),
            priority=self.priority,
            limits=Limits(self.images_per_minute, self.max_concurrent),
            kind=kind,
        )


@dataclass
class KeysFile:
    keys: list[KeyRecord] = field(default_factory=list)
    clients: list[KeyRecord] = field(default_factory=list)
    tenants: dict[str, Limits] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        def record(r: KeyRecord, kind: str) -> dict[str, Any]:
            data = asdict(r)
            data.pop("subject" if kind == "keys" else "sha256")
            return data

        return {
            "keys": [record(r, "keys") for r in self.keys],
            "clients": [record(r, "clients") for r in self.clients],
            "tenants": {name: asdict(limits) for name, limits in self.tenants.items()},
        }


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip("=")


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KeysFileError(f"{where} must be a whole number >= 0, got {value!r}")
    return value


def _record(data: Any, where: str, kind: str) -> KeyRecord:
    if not isinstance(data, dict):
        raise KeysFileError(f"{where} must be a mapping")
    known = {f for f in KeyRecord.__dataclass_fields__} - {"subject" if kind == "keys" else "sha256"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise KeysFileError(f"{where}: unknown fields {unknown}")
    for required in ("name", "tenant"):
        if not isinstance(data.get(required), str) or not data[required]:
            raise KeysFileError(f"{where}.{required} is required (a non-empty string)")
    record = KeyRecord(**data)
    if not record.name or not isinstance(record.name, str):
        raise KeysFileError(f"{where}.name is required")
    if not record.tenant or not isinstance(record.tenant, str):
        raise KeysFileError(f"{where}.tenant is required")
    if kind == "keys" and (
        len(record.sha256) != 64 or any(c not in "0123456789abcdef" for c in record.sha256)
    ):
        raise KeysFileError(f"{where}.sha256 must be 64 lowercase hex digits")
    if kind == "clients" and not record.subject:
        raise KeysFileError(f"{where}.subject is required")
    bad = sorted(set(record.scopes) - set(SCOPES))
    if not isinstance(record.scopes, list) or bad:
        raise KeysFileError(f"{where}.scopes must be a list of {', '.join(SCOPES)}; unknown: {bad}")
    if record.priority not in PRIORITIES:
        raise KeysFileError(
            f"{where}.priority must be one of {', '.join(PRIORITIES)}, got {record.priority!r}"
        )
    _int(record.images_per_minute, f"{where}.images_per_minute")
    _int(record.max_concurrent, f"{where}.max_concurrent")
    return record


def parse(text: str, source: str = "keys file") -> KeysFile:
    """The keys file's content (YAML, of which JSON is a subset); KeysFileError naming the bad field."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise KeysFileError(f"{source}: not valid YAML/JSON: {error}") from error
    if not isinstance(data, dict):
        raise KeysFileError(f"{source}: must be a mapping with keys:, clients:, tenants:")
    unknown = sorted(set(data) - {"keys", "clients", "tenants", "version"})
    if unknown:
        raise KeysFileError(f"{source}: unknown top-level fields {unknown}")
    parsed = KeysFile()
    for kind in ("keys", "clients"):
        entries = data.get(kind) or []
        if not isinstance(entries, list):
            raise KeysFileError(f"{source}: {kind} must be a list")
        records = [_record(entry, f"{kind}[{i}]", kind) for i, entry in enumerate(entries)]
        getattr(parsed, kind).extend(records)
    names = [r.name for r in parsed.keys + parsed.clients]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise KeysFileError(f"{source}: duplicate names {duplicates}")
    tenants = data.get("tenants") or {}
    if not isinstance(tenants, dict):
        raise KeysFileError(f"{source}: tenants must be a mapping of tenant -> limits")
    for tenant, limits in tenants.items():
        if not isinstance(limits, dict) or set(limits) - {"images_per_minute", "max_concurrent"}:
            raise KeysFileError(f"tenants.{tenant} may only set images_per_minute and max_concurrent")
        parsed.tenants[str(tenant)] = Limits(
            _int(limits.get("images_per_minute", 0), f"tenants.{tenant}.images_per_minute"),
            _int(limits.get("max_concurrent", 0), f"tenants.{tenant}.max_concurrent"),
        )
    return parsed


def load(path: str | os.PathLike[str]) -> KeysFile:
    path = Path(path)
    if not path.exists():
        return KeysFile()
    return parse(path.read_text(), str(path))


def save(path: str | os.PathLike[str], keys_file: KeysFile) -> None:
    """Writes atomically (a reader sees the old file or the new one), mode 0600; JSON for a .json path."""
    path = Path(path)
    data = keys_file.to_data()
    text = (
        json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


@contextlib.contextmanager
def _editing(path: str | os.PathLike[str]):
    """Serializes edits of one keys file (read, change, write) across threads and processes: two `unclip keys
    create` at once must not lose a key. A lock file beside it, held with flock."""
    lock_path = Path(path).with_name(f".{Path(path).name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock, open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_thread_lock = threading.Lock()  # flock does not exclude threads sharing the process's open file table


def create(
    path: str | os.PathLike[str],
    name: str,
    *,
    tenant: str | None = None,
    scopes: list[str] | None = None,
    priority: str = "interactive",
    images_per_minute: int = 0,
    max_concurrent: int = 0,
) -> str:
    """Adds a key named `name` to the file and returns the key (the only time it exists in clear)."""
    with _editing(path):
        return _create(path, name, tenant, scopes, priority, images_per_minute, max_concurrent)


def _create(path, name, tenant, scopes, priority, images_per_minute, max_concurrent) -> str:  # noqa: ANN001
    keys_file = load(path)
    if any(r.name == name for r in keys_file.keys + keys_file.clients):
        raise KeysFileError(f"name {name!r} already exists in {path}")
    key = new_key()
    record = KeyRecord(
        name=name,
        tenant=tenant or name,
        sha256=hash_key(key),
        scopes=list(scopes or ["generate", "vary", "edit"]),
        priority=priority,
        images_per_minute=images_per_minute,
        max_concurrent=max_concurrent,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    keys_file.keys.append(record)
    parse(yaml.safe_dump(keys_file.to_data()), str(path))  # the result must be a valid file
    save(path, keys_file)
    return key


def revoke(path: str | os.PathLike[str], name: str) -> None:
    with _editing(path):
        keys_file = load(path)
        for record in keys_file.keys + keys_file.clients:
            if record.name == name:
                record.revoked = True
                save(path, keys_file)
                return
    raise KeysFileError(f"no key named {name!r} in {path}")


class KeyStore:
    """The keys file in memory, re-read when it changes. Thread-safe."""

    def __init__(self, path: str | os.PathLike[str], check_interval_s: float = 0.2):
        self.path = Path(path)
        self.check_interval_s = check_interval_s  # how stale a lookup may be (revocation delay)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._by_hash: dict[str, KeyRecord] = {}
        self._by_subject: dict[str, KeyRecord] = {}
        self.tenants: dict[str, Limits] = {}
        self._refresh(force=True)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the symlinks a mounted Secret swaps
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self, force: bool = False, stat_now: bool = False) -> None:
        """Re-reads the file if it changed; its stat is checked at most every check_interval_s unless
        `stat_now` (an unknown key: a key created a moment ago works at once)."""
        now = time.monotonic()
        with self._lock:
            if not force and not stat_now and now - self._checked < self.check_interval_s:
                return
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp and not force:
                return
            try:
                parsed = load(self.path)
            except (OSError, KeysFileError) as error:
                log.error("keys file %s not reloaded, keeping the previous table: %s", self.path, error)
                if force and self._stamp is None:
                    raise
                return
            self._stamp = stamp
            self._by_hash = {r.sha256: r for r in parsed.keys}
            self._by_subject = {r.subject: r for r in parsed.clients}
            self.tenants = dict(parsed.tenants)
            log.info(
                "keys file %s loaded: %d keys, %d certificate clients",
                self.path,
                len(parsed.keys),
                len(parsed.clients),
            )

    def tenant_names(self) -> set[str]:
        self._refresh()
        with self._lock:
            return {r.tenant for r in [*self._by_hash.values(), *self._by_subject.values()]}

    def by_key(self, key: str) -> KeyRecord | None:
        """The record of `key` (revoked ones included: the caller says why it refuses), or None."""
        self._refresh()
        digest = hash_key(key)
        for attempt in range(2):
            with self._lock:
                for known, record in self._by_hash.items():  # constant-time compare per entry
                    if hmac.compare_digest(known, digest):
                        return record
            if attempt == 0:
                self._refresh(stat_now=True)  # one stat(): cheap, even for a flood of unknown keys
        return None

    def by_subject(self, subjects: list[str]) -> KeyRecord | None:
        self._refresh()
        with self._lock:
            for subject in subjects:
                if subject in self._by_subject:
                    return self._by_subject[subject]
        return None

    def tenant_limits(self, tenant: str) -> Limits:
        with self._lock:
            return self.tenants.get(tenant, Limits())
