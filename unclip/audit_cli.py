"""Prints and filters the safety service's audit log (services/safety/audit.py).

    unclip audit --action block                       the running local stack's refusals
    python -m unclip.audit_cli --dir runs/audit --since 2026-11-27T10:00

Which log: --dir, else UNCLIP_AUDIT_DIR, else the running local `unclip up`'s (unclip.stack_state), else
runs/audit. Filters combine (all must hold). Default output: one line per decision; `--json` prints the
records as stored. Exit codes: 0 done (also when nothing matched); 2 invalid arguments or no such directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from services.safety.audit import read_records
from unclip.cli_common import utc_time
from unclip.escape import printable, printable_json

_TIME = utc_time("milliseconds")  # as the audit log writes its times


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        default=None,
        help="audit log folder [env UNCLIP_AUDIT_DIR; default: the running `unclip up`'s, else runs/audit]",
    )
    parser.add_argument("--request-id", help="only this request")
    parser.add_argument("--user", help="only this caller (the request's `user` field)")
    parser.add_argument("--identity", help="only this authenticated identity (key:NAME, cert:SUBJECT)")
    parser.add_argument("--tenant", help="only this tenant")
    parser.add_argument(
        "--stage", choices=["prompt", "input_image", "decoder_output", "final_output"], help="only this check"
    )
    parser.add_argument("--action", choices=["allow", "flag", "withhold", "block"], help="only this action")
    parser.add_argument("--category", help="only decisions in which this category triggered")
    parser.add_argument("--filter", dest="filter_name", help="only decisions this filter scored or failed in")
    parser.add_argument("--policy-version", help="only decisions under this policy version")
    parser.add_argument("--since", type=_TIME, help="from this time (ISO 8601, UTC)")
    parser.add_argument("--until", type=_TIME, help="before this time (ISO 8601, UTC)")
    parser.add_argument(
        "--events",
        action="store_true",
        help="also policy events (policy_loaded, policy_rejected), not only decisions",
    )
    parser.add_argument("--json", action="store_true", help="print the matching records as JSON lines")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Hooks `audit` into a CLI's subparsers; the parsed namespace runs with `run(args)`."""
    parser = subparsers.add_parser(
        "audit",
        help="what the content policy decided, and why (the safety audit log)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def matches(record: dict[str, Any], args: argparse.Namespace) -> bool:
    if record.get("event") != "decision":
        return bool(args.events) and _in_time(record, args)
    checks = [
        (args.request_id, record.get("request_id")),
        (args.user, record.get("user")),
        (args.identity, record.get("identity")),
        (args.tenant, record.get("tenant")),
        (args.stage, record.get("stage")),
        (args.action, record.get("action")),
        (args.policy_version, record.get("policy_version")),
    ]
    if any(wanted is not None and wanted != value for wanted, value in checks):
        return False
    if args.category is not None and not any(
        args.category in v["categories"] for v in record.get("verdicts", [])
    ):
        return False
    if args.filter_name is not None and not any(
        f["filter"] == args.filter_name for f in record.get("filters", [])
    ):
        return False
    return _in_time(record, args)


def _in_time(record: dict[str, Any], args: argparse.Namespace) -> bool:
    stamp = str(record.get("time", "")).rstrip("Z")
    return (args.since is None or stamp >= args.since) and (args.until is None or stamp < args.until)


def format_record(record: dict[str, Any]) -> str:
    if record.get("event") != "decision":
        details = {k: v for k, v in record.items() if k not in ("event", "time")}
        details_json = printable_json(json.dumps(details, ensure_ascii=False))
        event = printable(record.get("event", "?"))
        return f"{printable(record.get('time', ''))}  {event:<15} {details_json}"
    # Every field is printed through `printable`: a `user` with a newline must not forge a second line.
    categories = sorted({printable(c) for v in record.get("verdicts", []) for c in v["categories"]})
    failed = [printable(f["filter"]) for f in record.get("filters", []) if "error" in f]
    parts = [
        printable(record.get("time", "")),
        f"{printable(record.get('action', '?')):<8}",
        f"{printable(record.get('stage', '?')):<14}",
        f"request={printable(record.get('request_id') or '-')}",
        f"user={printable(record.get('user') or '-')}",
    ]
    if record.get("identity"):
        parts.append(f"identity={printable(record['identity'])}")
    if record.get("tenant"):
        parts.append(f"tenant={printable(record['tenant'])}")
    parts.append(f"categories={','.join(categories) or '-'}")
    if record.get("items", 1) > 1:
        withheld = sum(1 for v in record["verdicts"] if v["action"] == "withhold")
        parts.append(f"images={record['items']} withheld={withheld}")
    if failed:
        parts.append(f"failed={','.join(failed)}")
    parts.append(f"policy={printable(record.get('policy_version', '?'))}")
    return "  ".join(parts)


def audit_dir(args: argparse.Namespace) -> tuple[str, str]:
    """The folder to read and where that choice came from (for the error when it does not exist)."""
    from unclip.runtime.settings import SETTINGS
    from unclip.stack_state import find_path

    folder, source = find_path(args.dir, "audit_dir")
    if folder is None:
        return SETTINGS["audit_dir"].default, f"the default, as {source}"
    return str(folder), source


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    directory, source = audit_dir(args)
    if not os.path.isdir(directory):
        print(
            f"unclip audit: no audit log at {directory} ({source}); start a stack with `unclip up` "
            "(it prints where its audit log is), or pass --dir",
            file=sys.stderr,
        )
        return 2
    args.dir = directory
    records: Iterable[dict[str, Any]] = (r for r in read_records(args.dir) if matches(r, args))
    try:
        for record in records:
            if args.json:
                line = printable_json(json.dumps(record, ensure_ascii=False))
            else:
                line = format_record(record)
            print(line, file=out)
    except BrokenPipeError:  # `| head` is fine
        return 0
    return 0


DESCRIPTION = """\
What the content policy decided about each request, and why: one line per decision (time, action, check,
request, user, categories, policy version), read from the safety service's audit log.

The log read is --dir, else UNCLIP_AUDIT_DIR, else the log of the `unclip up` running on this machine, else
runs/audit. Filters combine: a decision is printed when it matches all of them."""

EXAMPLES = """\
examples:
  unclip audit                                 every decision of the running stack
  unclip audit --action block                  only the refusals
  unclip audit --category violence --since 2026-11-27T10:00
  unclip audit --request-id 3f2a... --json     one request, as stored

exit status: 0 done (also when nothing matched); 2 invalid arguments or no audit log found"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="unclip audit",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
