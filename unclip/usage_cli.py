"""`unclip usage`: what each key or tenant used, summed from the orchestrator's usage ledger
(unclip.access.usage).

    unclip usage                         # by key, everything in the running local stack's ledger
    unclip usage --by tenant --since 2026-12-01T00:00 --json
    unclip usage --dir /var/lib/unclip/usage

Without --dir: UNCLIP_USAGE_DIR, else the running `unclip up` stack's ledger (its state file).
Exit codes: 0 done (also when nothing matched); 2 invalid arguments or no ledger found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from unclip.access.usage import read_records
from unclip.cli_common import utc_time


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Hooks `usage` into a CLI's subparsers; the parsed namespace runs with `run(args)`."""
    parser = subparsers.add_parser(
        "usage", help="images, compute and energy by key or tenant", description=__doc__
    )
    parser.add_argument(
        "--dir", default=None, help="ledger folder [env UNCLIP_USAGE_DIR, else the local stack's]"
    )
    parser.add_argument(
        "--since", type=utc_time("seconds"), default=None, help="from this time (ISO 8601, UTC)"
    )
    parser.add_argument("--by", choices=["key", "tenant"], default="key", help="group by (default key)")
    parser.add_argument("--json", action="store_true", help="one JSON object per group")
    parser.set_defaults(func=run)
    return parser


def ledger_dir(flag: str | None) -> Path | None:
    """--dir, else UNCLIP_USAGE_DIR, else the running `unclip up` stack's ledger, else None."""
    from unclip.stack_state import find_path

    return find_path(flag, "usage_dir")[0]


def summarize(records, by: str, since: str | None) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        if since is not None and record["time"].rstrip("Z") < since:
            continue
        name = record["principal"] if by == "key" else record["tenant"]
        group = groups.setdefault(
            name,
            {by: name, "requests": 0, "images": 0, "compute_seconds": 0.0, "energy_joules": 0.0},
        )
        if by == "key":
            group["tenant"] = record["tenant"]
        group["requests"] += 1
        group["images"] += record["images"]
        group["compute_seconds"] += record["compute_seconds"]
        group["energy_joules"] += record["energy_joules"]
    return sorted(groups.values(), key=lambda g: -g["compute_seconds"])


def run(args: argparse.Namespace) -> int:
    directory = ledger_dir(args.dir)
    if directory is None or not directory.is_dir():
        where = directory or "(none: no --dir, no UNCLIP_USAGE_DIR, no running `unclip up`)"
        print(f"unclip usage: invalid input: no usage ledger at {where}", file=sys.stderr)
        return 2
    rows = summarize(read_records(directory), args.by, args.since)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    print(f"{args.by:<24} {'requests':>8} {'images':>7} {'compute s':>10} {'energy J':>10}")
    for row in rows:
        print(
            f"{row[args.by]:<24} {row['requests']:>8} {row['images']:>7} {row['compute_seconds']:>10.2f} "
            f"{row['energy_joules']:>10.1f}"
        )
    return 0
