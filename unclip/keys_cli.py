"""`unclip keys create|list|revoke`: manage the API keys of a keys file (unclip.access.keys).

    unclip keys create ci-bot --tenant team-a --priority batch --images-per-minute 60 --keys-file keys.yaml
    unclip keys list --keys-file keys.yaml
    unclip keys revoke ci-bot --keys-file keys.yaml

`create` prints the key once, on stdout (nothing keeps it in clear); the orchestrator reading the file picks
the change up within a second. Without --keys-file: UNCLIP_KEYS_FILE, else the running `unclip up`'s file.
Exit codes: 0 done; 2 invalid input (the message names the field or name).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from unclip.access import keys


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Hooks `keys` into a CLI's subparsers; the parsed namespace runs with `run(args)`."""
    parser = subparsers.add_parser("keys", help="create, list and revoke API keys", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="add a key and print it (once)")
    create.add_argument("name")
    create.add_argument("--tenant", default=None, help="who is charged (default: the name)")
    create.add_argument(
        "--scopes", default="generate,vary,edit", help=f"comma-separated, of {', '.join(keys.SCOPES)}"
    )
    create.add_argument("--priority", choices=keys.PRIORITIES, default="interactive")
    create.add_argument("--images-per-minute", type=int, default=0, help="token bucket (0: no limit)")
    create.add_argument("--max-concurrent", type=int, default=0, help="requests in progress (0: no limit)")
    listing = actions.add_parser("list", help="the keys (names, tenants, scopes, limits; never the keys)")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="refuse a key from now on (within a second)")
    revoke.add_argument("name")
    for sub in (create, listing, revoke):
        sub.add_argument("--keys-file", default=None, help="[env UNCLIP_KEYS_FILE, else the local stack's]")
    parser.set_defaults(func=run)
    return parser


def keys_file(flag: str | None) -> str:
    """--keys-file, else UNCLIP_KEYS_FILE, else the running `unclip up` stack's (KeysFileError: none)."""
    from unclip.stack_state import find_path

    path, source = find_path(flag, "keys_file", "--keys-file")
    if path is None:
        raise keys.KeysFileError(f"--keys-file is required (no UNCLIP_KEYS_FILE, and {source})")
    return str(path)


def run(args: argparse.Namespace) -> int:
    try:
        path = keys_file(args.keys_file)
        if args.action == "create":
            for name in ("images_per_minute", "max_concurrent"):
                if getattr(args, name) < 0:
                    raise keys.KeysFileError(f"--{name.replace('_', '-')} must be >= 0")
            key = keys.create(
                path,
                args.name,
                tenant=args.tenant,
                scopes=[s.strip() for s in args.scopes.split(",") if s.strip()],
                priority=args.priority,
                images_per_minute=args.images_per_minute,
                max_concurrent=args.max_concurrent,
            )
            print(key)
            print(f"key {args.name!r} added to {path}; it is shown only this once", file=sys.stderr)
        elif args.action == "revoke":
            keys.revoke(path, args.name)
            print(f"key {args.name!r} revoked in {path}", file=sys.stderr)
        else:
            print_list(keys.load(path), args.json)
    except keys.KeysFileError as error:
        print(f"unclip keys {args.action}: invalid input: {error}", file=sys.stderr)
        return 2
    return 0


def print_list(parsed: keys.KeysFile, as_json: bool) -> None:
    rows = []
    for kind, records in (("key", parsed.keys), ("cert", parsed.clients)):
        for r in records:
            rows.append(
                {
                    "kind": kind,
                    "name": r.name,
                    "tenant": r.tenant,
                    "scopes": r.scopes,
                    "priority": r.priority,
                    "images_per_minute": r.images_per_minute,
                    "max_concurrent": r.max_concurrent,
                    "revoked": r.revoked,
                    "created": r.created,
                }
            )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "REVOKED" if row["revoked"] else "active"
        print(
            f"{row['name']:<20} {row['kind']:<4} tenant={row['tenant']:<12} {state:<7} "
            f"priority={row['priority']} scopes={','.join(row['scopes'])} "
            f"images/min={row['images_per_minute'] or '-'} concurrent={row['max_concurrent'] or '-'}"
        )
