"""`unclip info`: what the connected stack can do, from its GetCapabilities answer.

Prints every field the answer has, generically (sizes, model, defaults per kind of request, limits, and any
field added later, e.g. samplers), so the CLI never states a default the stack does not use. `--json` prints
the answer as JSON.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# Capabilities fields printed by a dedicated section; every other field is printed generically.
_SECTIONS = {"defaults", "edit_defaults", "limits"}
_LABELS = {
    "sizes": "sizes (px)",
    "defaults": "defaults for generate and vary (unset flags)",
    "edit_defaults": "defaults for edit (unset flags)",
    "max_n": "images per request, at most",
    "max_prompt_chars": "prompt characters, at most",
    "vocabulary_words": "words in the model's vocabulary (0: prompts not checked)",
}


# SamplingParams fields -> the generate/vary/edit flag that sets them.
_FLAGS = {
    "prior_num_inference_steps": "--prior-steps",
    "prior_guidance_scale": "--prior-guidance",
    "decoder_num_inference_steps": "--decoder-steps",
    "decoder_guidance_scale": "--decoder-guidance",
    "super_res_num_inference_steps": "--super-res-steps",
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Hooks `info` into the CLI's subparsers."""
    from unclip.cli_common import addr_help

    parser = subparsers.add_parser(
        "info",
        help="what the running stack can do: sizes, model, defaults, limits",
        description="Asks the running stack (GetCapabilities) what it can do and prints it: the sizes it "
        "makes, the model it serves, the defaults each kind of request gets for the flags you leave out, "
        "and the request limits.",
    )
    parser.add_argument("--addr", default=None, help=addr_help())
    parser.add_argument(
        "--api-key", default=None, help="API key [env UNCLIP_API_KEY, else the running `unclip up`'s]"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.set_defaults(func=run, wait=False)
    return parser


def _value(field: FieldDescriptor, value: Any) -> str:
    if field.type == FieldDescriptor.TYPE_FLOAT or field.type == FieldDescriptor.TYPE_DOUBLE:
        return f"{value:g}"
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return "  ".join(f"{f.name}={_value(f, v)}" for f, v in value.ListFields())
    return str(value)


def _field_text(field: FieldDescriptor, value: Any) -> str:
    if field.is_repeated:
        return ", ".join(_value(field, item) for item in value) or "-"
    return _value(field, value)


def format_capabilities(capabilities: Message, addr: str) -> str:
    """The answer as aligned lines: generic fields, then the defaults per kind of request, then limits."""
    lines = [f"stack at {addr}"]
    for field in capabilities.DESCRIPTOR.fields:
        if field.name in _SECTIONS:
            continue
        value = getattr(capabilities, field.name)
        lines.append(
            f"  {_LABELS.get(field.name, field.name.replace('_', ' ')):<58} {_field_text(field, value)}"
        )
    for name in ("defaults", "edit_defaults"):
        lines.append(f"{_LABELS[name]}:")
        params = getattr(capabilities, name)
        for field, value in params.ListFields():
            flag = _FLAGS.get(field.name, "")
            lines.append(f"  {field.name:<32} {flag:<20} {_field_text(field, value)}")
    if capabilities.limits:
        lines.append("limits (inclusive):")
        for limit in capabilities.limits:
            lines.append(f"  {limit.field:<28} {limit.low}..{limit.high:<22} {limit.why}")
    return "\n".join(lines)


def run(args: argparse.Namespace, out=None) -> int:
    from google.protobuf.json_format import MessageToJson

    from unclip.cli_common import check_addr, default_addr, orchestrator_channel
    from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc

    out = out or sys.stdout
    args.addr = args.addr or default_addr()
    check_addr(args.addr)
    with orchestrator_channel(args) as channel:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        capabilities = stub.GetCapabilities(orchestrator_pb2.CapabilitiesRequest(), timeout=args.timeout)
    if args.json:
        print(MessageToJson(capabilities, preserving_proto_field_name=True), file=out)
    else:
        print(format_capabilities(capabilities, args.addr), file=out)
    return 0
