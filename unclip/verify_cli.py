"""`unclip verify FILE... [--json]`: is each image ours, and unaltered? One line per file.

The orchestrator's Verify RPC does the check (it holds the deployment's trust anchors and watermark key; the
key never leaves the service): the PNG metadata, the C2PA manifest (signature, certificate chain, hash
binding) and the invisible watermark (unclip/provenance/verify.py has the rules).

Exit codes: 0 every file ours and intact; 6 ours but altered (manifest broken, or stripped while the watermark
remains); 7 nothing of ours found; with several files the worst of them (7 over 6 over 0); 1 when a file
could not be checked (unreadable, not an image, the service unreachable), which outranks them all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_ALTERED, EXIT_NOT_OURS = 0, 1, 6, 7
RANK = [EXIT_OK, EXIT_ALTERED, EXIT_NOT_OURS, EXIT_ERROR]  # worst last


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Hooks `verify` into a CLI's subparsers; the parsed namespace runs with `run(args)`."""
    from unclip.cli_common import addr_help

    parser = subparsers.add_parser(
        "verify", help="check whether images are ours and unaltered (metadata, C2PA, watermark)"
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="PNG, JPEG or WebP files")
    parser.add_argument("--json", action="store_true", help="one JSON object per file instead of a line")
    parser.add_argument("--addr", default=None, help=addr_help())
    parser.add_argument(
        "--api-key", default=None, help="API key [env UNCLIP_API_KEY, else the running `unclip up`'s]"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per file")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import grpc

    from unclip.cli_common import orchestrator_channel
    from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    worst = EXIT_OK
    with orchestrator_channel(args) as channel:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        for path in args.files:
            try:
                data = Path(path).read_bytes()
                response = stub.Verify(orchestrator_pb2.VerifyRequest(image=data), timeout=args.timeout)
            except OSError as error:
                code, record = EXIT_ERROR, {"file": path, "error": f"cannot read: {error.strerror}"}
            except grpc.RpcError as error:
                code, record = EXIT_ERROR, {"file": path, "error": f"{error.code().name}: {error.details()}"}
            else:
                code, record = _record(path, response)
            _print(record, code, args.json)
            worst = max(worst, code, key=RANK.index)
    return worst


def _record(path: str, response) -> tuple[int, dict[str, Any]]:
    from google.protobuf.json_format import MessageToDict

    from unclip.v1 import orchestrator_pb2

    code = {
        orchestrator_pb2.VERIFY_VERDICT_INTACT: EXIT_OK,
        orchestrator_pb2.VERIFY_VERDICT_ALTERED: EXIT_ALTERED,
    }.get(response.verdict, EXIT_NOT_OURS)
    record = {"file": path, **MessageToDict(response, preserving_proto_field_name=True)}
    record["verdict"] = {EXIT_OK: "intact", EXIT_ALTERED: "altered"}.get(code, "not_ours")
    return code, record


def _print(record: dict[str, Any], code: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**record, "exit_code": code}, sort_keys=True), flush=True)
    elif "error" in record:
        print(f"{record['file']}: error: {record['error']}", flush=True)
    else:
        print(f"{record['file']}: {record['summary']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unclip")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["verify", *(argv if argv is not None else sys.argv[1:])])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
