"""`unclip certs mint --out DIR`: the Secrets of a Kubernetes deployment without cert-manager, as files.

    unclip certs mint --out secrets/ [--namespace unclip] [--days 365] [--client reporting.team-b.svc]
    for d in secrets/unclip-*/; do
        kubectl -n unclip create secret generic "$(basename "$d")" --from-file="$d"
    done

Writes one folder per Secret that k8s/overlays/gpu-plain-secrets mounts, each file a key of the Secret (the
layout cert-manager writes): a new CA (ECDSA P-256) and, for every service, `unclip-tls-<service>/` with
tls.crt, tls.key and ca.crt, whose subject CN is the identity the stages admit (unclip.access.interceptor)
and whose DNS SANs are the Service's names in the namespace; `unclip-c2pa/` (a C2PA signer issued by the same
CA: tls.crt = leaf then CA, tls.key, ca.crt); `unclip-watermark/watermark.key` (32 random bytes); and with
--client, `clients/<subject>/` certificates for the orchestrator's TLS front door (list the subject under
`clients:` in the keys file). The CA's key is not kept: run again into a new folder to rotate everything.
Private keys are mode 0600 in 0700 folders. Exit codes: 0 written; 2 invalid input (the message names it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

from unclip.access.tls import mint_ca, mint_leaf, mint_signer, pem, write_key

# Secret suffix (= the Service `unclip-<suffix>`) -> the identity in its certificate's CN.
SERVICES = {
    "orchestrator": "orchestrator",
    "encoder": "encoder",
    "prior": "prior",
    "decoder": "decoder",
    "super-res": "super_res",
    "super-res-2": "super_res_2",
    "safety": "safety",
}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names a pod in the cluster reaches the Service `service` by."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=False)
    os.chmod(path, 0o700)
    return path


def mint(out: Path, namespace: str = "unclip", days: int = 365, clients: tuple[str, ...] = ()) -> list[Path]:
    """Writes the Secrets' folders into `out` (which must not exist or be empty); returns them."""
    validity = datetime.timedelta(days=days)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca_key, ca_cert = mint_ca(f"unclip stack CA ({namespace})", validity)
    written = []
    for suffix, identity in SERVICES.items():
        folder = _folder(out / f"unclip-tls-{suffix}")
        key, cert = mint_leaf(
            ca_key, ca_cert, identity, service_dns_names(f"unclip-{suffix}", namespace), validity
        )
        (folder / "tls.crt").write_bytes(pem(cert))
        write_key(folder / "tls.key", key)
        (folder / "ca.crt").write_bytes(pem(ca_cert))
        written.append(folder)
    folder = _folder(out / "unclip-c2pa")
    key, cert = mint_signer(ca_key, ca_cert, "unclip C2PA signer", validity)
    (folder / "tls.crt").write_bytes(pem(cert) + pem(ca_cert))  # the chain C2PA embeds: leaf, then CA
    write_key(folder / "tls.key", key)
    (folder / "ca.crt").write_bytes(pem(ca_cert))
    written.append(folder)
    folder = _folder(out / "unclip-watermark")
    fd = os.open(folder / "watermark.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    written.append(folder)
    for subject in clients:
        (out / "clients").mkdir(mode=0o700, exist_ok=True)
        folder = _folder(out / "clients" / subject)
        key, cert = mint_leaf(ca_key, ca_cert, subject, [], validity)
        (folder / "tls.crt").write_bytes(pem(cert))
        write_key(folder / "tls.key", key)
        (folder / "ca.crt").write_bytes(pem(ca_cert))
        written.append(folder)
    return written  # the CA's key is not kept: nothing more can be signed by it


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Hooks `certs` into a CLI's subparsers; the parsed namespace runs with `run(args)`."""
    parser = subparsers.add_parser(
        "certs", help="mint the certificates and keys of a Kubernetes deployment", description=__doc__
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", required=True)
    minting = actions.add_parser(
        "mint", help="a CA, every service's certificate, the C2PA signer, a watermark key"
    )
    minting.add_argument("--out", required=True, help="folder to write (new or empty)")
    minting.add_argument("--namespace", default="unclip", help="the Services' namespace (default unclip)")
    minting.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    minting.add_argument(
        "--client", action="append", default=[], help="a front-door client certificate for this subject"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"--out: {out} exists and is not an empty folder (nothing is overwritten)", file=sys.stderr)
        return 2
    if not _DNS_LABEL.match(args.namespace):
        print(f"--namespace: {args.namespace!r} is not a Kubernetes namespace name", file=sys.stderr)
        return 2
    if not 1 <= args.days <= 3650:
        print(f"--days must be between 1 and 3650, got {args.days}", file=sys.stderr)
        return 2
    bad = [c for c in args.client if not c or "/" in c or c in (".", "..")]
    if bad:
        print(f"--client: {bad[0]!r} cannot name a folder", file=sys.stderr)
        return 2
    written = mint(out, args.namespace, args.days, tuple(args.client))
    for folder in written:
        if folder.parent == out:
            print(f"kubectl -n {args.namespace} create secret generic {folder.name} --from-file={folder}")
    print(
        f"wrote {len(written)} folders into {out}; the CA's key was not kept (run again to rotate); "
        "the orchestrator's keys file: unclip keys create NAME --keys-file keys.yaml, then "
        f"kubectl -n {args.namespace} create secret generic unclip-keys --from-file=keys.yaml",
        file=sys.stderr,
    )
    return 0
