"""python -m services.gateway --orchestrator-addr ADDR --port P: the OpenAI-compatible HTTP door.

Serves /v1/images/generations, /v1/images/edits, /v1/images/variations and /v1/models (the OpenAI Images API
as for dall-e-2), /v1/images/interpolations and /v1/images/text-diffs (unclip's extensions), /healthz (alive),
/readyz (the orchestrator is SERVING), /metrics (Prometheus), /docs (OpenAPI) and the playground page at /.
Every flag also reads its environment variable
(unclip.runtime.settings, section "HTTP gateway"). `--port 0` picks a free port; the first log line says
which ("gateway listening on HOST:PORT"), as the gRPC services do.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

import uvicorn

from services.gateway.app import GatewayConfig, create_app
from services.gateway.client import OrchestratorConfig
from services.gateway.links import LinkConfig
from unclip.runtime import settings
from unclip.runtime.metrics import start_metrics_server
from unclip.runtime.server import configure_logging, die_with_parent

log = logging.getLogger("services.gateway")


def config_from(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        orchestrator=OrchestratorConfig(
            address=args.orchestrator_addr,
            timeout_seconds=args.request_timeout_seconds,
            model_name=args.model_name,
            max_message_bytes=args.max_message_bytes,
        ),
        links=LinkConfig(
            ttl_seconds=args.link_ttl_seconds,
            max_bytes=args.link_cache_bytes,
            secret=args.link_secret.encode(),
        ),
        public_url=args.public_url,
        max_upload_bytes=args.max_upload_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    settings.add_arguments(
        parser,
        [
            "orchestrator_addr",
            "model_name",
            "public_url",
            "link_ttl_seconds",
            "link_cache_bytes",
            "link_secret",
            "max_upload_bytes",
            "request_timeout_seconds",
            "host",
            "port",
            "max_message_bytes",
            "grace_seconds",
            "metrics_port",
        ],
        port=settings.DEFAULT_PORTS["gateway"],
    )
    args = parser.parse_args(argv)
    if args.max_upload_bytes < 1 or args.link_ttl_seconds <= 0:
        parser.error("--max-upload-bytes and --link-ttl-seconds must be positive")
    configure_logging("gateway")
    die_with_parent()
    start_metrics_server(args.metrics_port)  # also at /metrics on the HTTP port
    # Bound here, not by uvicorn, so port 0 resolves before the announcement `unclip up` waits for.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        parser.error(f"cannot listen on {args.host}:{args.port}: {error}")
    sock.listen(2048)
    port = sock.getsockname()[1]
    log.info("gateway listening on %s:%d (orchestrator %s)", args.host, port, args.orchestrator_addr)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config_from(args)),
            lifespan="on",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=int(args.grace_seconds),
        )
    )
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
