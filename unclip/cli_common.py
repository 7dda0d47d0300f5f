"""What every `unclip` subcommand that talks to a stack shares: where the stack is, checking a request's
flags before any call, naming output files without overwriting, and one-line connection errors.

Where the stack is: `--addr`, else `UNCLIP_ADDR`, else the running local `unclip up` (unclip.stack_state),
else 127.0.0.1:50051. So a person who started `unclip up` in one shell needs no flag in another.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc

from unclip import limits
from unclip.access.client import resolve_address

START_HINT = "start one with `unclip up --model models/shapes-toy`, or pass --addr HOST:PORT"


class UsageError(Exception):
    """Bad input found before any call (exit 2)."""


# ---- where the stack is ------------------------------------------------------------------------------------


def default_addr() -> str:
    """UNCLIP_ADDR, else the running local stack's orchestrator, else 127.0.0.1:50051."""
    return resolve_address(None)


def addr_help() -> str:
    return (
        "orchestrator address HOST:PORT [env UNCLIP_ADDR; default: the running `unclip up`, "
        "else 127.0.0.1:50051]"
    )


def check_addr(addr: str) -> None:
    """A gRPC target is HOST:PORT (or dns:///HOST:PORT), not a URL."""
    scheme, sep, rest = addr.partition("://")
    if sep and scheme in ("http", "https", "grpc", "grpcs"):
        raise UsageError(f"--addr is a gRPC HOST:PORT, not a URL: got {addr}; try --addr {rest.rstrip('/')}")
    if not sep and ":" not in addr:
        raise UsageError(f"--addr must be HOST:PORT, got {addr}; e.g. --addr 127.0.0.1:50051")


# ---- a request's flags -------------------------------------------------------------------------------------

# (flag, limit in unclip.limits) checked before any call, so `-n 0` is as wrong as `-n 11`.
REQUEST_FLAG_LIMITS = [
    ("n", "n", "-n"),
    ("prior_steps", "steps", "--prior-steps"),
    ("decoder_steps", "steps", "--decoder-steps"),
]


def check_request_flags(args: argparse.Namespace) -> None:
    """Every request flag within its limit (unclip.limits), else UsageError naming the flag."""
    for attribute, limit, flag in REQUEST_FLAG_LIMITS:
        value = getattr(args, attribute, None)
        if value is not None:
            try:
                limits.check(limit, value, field=flag)
            except ValueError as error:
                raise UsageError(str(error)) from None
    args.addr = resolve_address(args.addr)
    check_addr(args.addr)


def utc_time(timespec: str) -> Callable[[str], str]:
    """An argparse `type` for --since / --until: an ISO 8601 time (an offset or Z converted to UTC) as the
    logs write times (UTC, no offset, to `timespec`), so that filters compare text."""

    def parse(text: str) -> str:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from error
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC).replace(tzinfo=None)
        return moment.isoformat(timespec=timespec)

    return parse


def limit_range(name: str) -> str:
    limit = limits.LIMITS[name]
    return f"{limit.low}..{limit.high}"


# ---- output files ------------------------------------------------------------------------------------------


def output_path(folder: Path, stem: str, overwrite: bool, suffix: str = ".png") -> Path:
    """`folder/stem.png`, or when that exists (and not `overwrite`) the first free `stem_2.png`, `stem_3.png`,
    ...: a run never replaces an earlier picture silently."""
    path = folder / f"{stem}{suffix}"
    copy = 2
    while path.exists() and not overwrite:
        path = folder / f"{stem}_{copy}{suffix}"
        copy += 1
    return path


# ---- errors ------------------------------------------------------------------------------------------------


def connection_problem(error: grpc.RpcError, addr: str, args: argparse.Namespace) -> str | None:
    """One line with the likely cause and the fix when the call never reached a working stack; else None."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if "waiting for its stages" in details:
            return f"the stack at {addr} is still starting (its stages are loading); try again in a moment"
        cause = _cause(details)
        return f"no stack at {addr}{cause} — {START_HINT}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and getattr(args, "wait", False):
        return (
            f"no stack answered at {addr} within {args.timeout:g} s (--wait) — is `unclip up` running? "
            f"{START_HINT}"
        )
    return None


def _cause(details: str) -> str:
    lowered = details.lower()
    for needle, cause in [
        ("connection refused", "nothing listens there"),
        ("dns resolution failed", "the host name does not resolve"),
        ("misformatted domain name", "the address is not HOST:PORT"),
        ("deadline", "it did not answer in time"),
    ]:
        if needle in lowered:
            return f" ({cause})"
    return ""


# ---- argument parsing --------------------------------------------------------------------------------------


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand of `parser`."""
    for action in parser._subparsers._group_actions:  # noqa: SLF001 (argparse keeps them only here)
        if command in getattr(action, "choices", {}):
            return action.choices[command]
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that an unknown flag is reported with its subcommand's usage (and the closest
    known flag), not the top-level usage."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = subcommand_parser(parser, args.command)
        known = [option for action in sub._actions for option in action.option_strings]  # noqa: SLF001
        hints = [
            f"{word}: did you mean {' or '.join(close)}?"
            for word in extra
            if (close := difflib.get_close_matches(word.split("=")[0], known, n=2, cutoff=0.6))
        ]
        message = f"unrecognized arguments: {' '.join(extra)}"
        sub.error(message + ("; " + "; ".join(hints) if hints else "") + f" (see `unclip {args.command} -h`)")
    return args


def orchestrator_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the orchestrator at `args.addr` (resolved by check_request_flags or here) carrying the
    API key: --api-key, else UNCLIP_API_KEY, else the key of the running `unclip up` at that address."""
    from unclip.access.client import resolve_key, with_key
    from unclip.runtime.server import create_channel

    address = resolve_address(getattr(args, "addr", None))
    return with_key(create_channel(address), resolve_key(getattr(args, "api_key", None), address))
