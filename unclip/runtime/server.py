"""The gRPC server every service runs, and the matching client channel.

`serve()` is the life of one process:
1. bind the port and start answering at once, with grpc.health.v1 saying NOT_SERVING (so probes see "alive,
not
   ready" while weights load) and server reflection on (so `grpcurl` can list and call every method);
2. load the weights and run one warm-up in a background thread, then say SERVING;
3. on SIGTERM / SIGINT: say NOT_SERVING, stop accepting new calls, let in-flight calls finish for up to
   `grace_seconds`, then exit.
Reflection is a setting (UNCLIP_REFLECTION, off in the production overlays). Every server guards its
requests (unclip.runtime.guard): unparseable or oversized is INVALID_ARGUMENT, with one log line.
Interceptors (telemetry, metrics) are passed through `interceptors=`; this module knows nothing about them.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from unclip.runtime.guard import RequestGuard, receive_limit
from unclip.runtime.memory import bound_allocator, trim
from unclip.runtime.settings import DEFAULT_MAX_MESSAGE_BYTES
from unclip.runtime.threads import single_threaded

log = logging.getLogger(__name__)

# serve() hands free heap memory back every TRIM_EVERY_TICKS half-seconds (a few ms each time).
TRIM_EVERY_TICKS = 20

# The flags every service takes (see unclip.runtime.settings).
SERVER_SETTINGS = [
    "metrics_port",
    "metrics_host",
    "reflection",
    "malloc_tuning",
    "host",
    "port",
    "max_message_bytes",
    "grace_seconds",
    "max_connection_age_seconds",
    "max_workers",
    # access control (unclip.access): this server's TLS, the health-only port, who may call, and the client
    # certificate this process presents to the stages it calls
    "tls_cert",
    "tls_key",
    "client_ca",
    "health_port",
    "allowed_callers",
    "stage_tls_cert",
    "stage_tls_key",
    "stage_tls_ca",
]

# The credentials of this process's channels to other stages (configure_stage_channels; None: plaintext).
_stage_credentials: grpc.ChannelCredentials | None = None


# The flags of the model stages' queues and step-level batching (unclip.batching).
BATCHING_SETTINGS = [
    "max_batch_size",
    "max_queue_delay_ms",
    "idle_dispatch",
    "step_queue_delay_ms",
    "max_queue_size",
    "deterministic",
]


def batcher_config(args: argparse.Namespace):
    """The BatcherConfig of a model stage from its BATCHING_SETTINGS flags; also raises `max_workers` so
    every request the queue may hold has a server thread to wait on (else gRPC queues them unbounded)."""
    from unclip.batching.batcher import BatcherConfig

    for name in ("max_batch_size", "max_queue_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    config = BatcherConfig(
        max_batch_size=args.max_batch_size,
        max_queue_delay_s=max(0.0, args.max_queue_delay_ms) / 1000,
        idle_dispatch=args.idle_dispatch,
        first_step_delay_s=max(0.0, args.step_queue_delay_ms) / 1000,
        max_queue_size=args.max_queue_size,
        deterministic=args.deterministic,
    )
    args.max_workers = max(args.max_workers, args.max_batch_size + args.max_queue_size + 4)
    return config


def message_options(max_message_bytes: int, max_receive_bytes: int | None = None) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        (
            "grpc.max_receive_message_length",
            max_message_bytes if max_receive_bytes is None else max_receive_bytes,
        ),
    ]


def create_server(
    address: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_connection_age_seconds: float | None = None,
    max_workers: int = 8,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    service_names: Iterable[str] = (),
    name: str = "server",
) -> tuple[grpc.Server, int]:
    """A server bound to `address` ("host:port", port 0 picks a free one; TLS with `credentials`); returns it
    (not started) and its port.

    Every server runs the RequestGuard (unclip.runtime.guard) innermost: a request that does not parse or is
    over its method's limit is INVALID_ARGUMENT. Its receive limit is the largest legitimate request of
    `service_names` (never above `max_message_bytes`), so an oversized request is refused before it is
    buffered whole.
    """
    service_names = list(service_names)
    receive = min(max_message_bytes, receive_limit(service_names)) if service_names else max_message_bytes
    options = message_options(max_message_bytes, receive)
    # Two servers on one port must fail loudly, not share it (Linux gRPC sets SO_REUSEPORT by default).
    options.append(("grpc.so_reuseport", 0))
    if max_connection_age_seconds:
        # Clients reconnect (and re-resolve dns:/// names) after this age, so new replicas get traffic.
        options.append(("grpc.max_connection_age_ms", int(max_connection_age_seconds * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(max_connection_age_seconds * 1000)))
    server = grpc.server(
        # Request threads run torch single-threaded: only the stage's compute thread has an OpenMP team
        # (unclip.runtime.threads: more teams than CPUs make every parallel region sleep and wake).
        futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=f"{name}-rpc", initializer=single_threaded
        ),
        interceptors=[*interceptors, RequestGuard(name)],
        options=options,
    )
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port


def create_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.Channel:
    """A client channel with the same message limits; `dns:///name:port` targets balance round-robin; TLS
    with `credentials`."""
    options: list[tuple[str, object]] = list(message_options(max_message_bytes))
    options.append(("grpc.lb_policy_name", "round_robin"))
    # A replica that comes back (restart, rollout) is reached within ~2 s, not after gRPC's default backoff of
    # up to 120 s, during which calls on this channel fail at once while the stage is already SERVING again.
    options.append(("grpc.initial_reconnect_backoff_ms", 200))
    options.append(("grpc.max_reconnect_backoff_ms", 2000))
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


def configure_stage_channels(args: argparse.Namespace) -> None:
    """Sets the client certificate (mTLS) this process presents to the stages it calls, from its
    `--stage-tls-*` flags; without `--stage-tls-ca` its stage channels stay plaintext."""
    global _stage_credentials
    if getattr(args, "stage_tls_ca", None):
        from unclip.access.tls import channel_credentials

        _stage_credentials = channel_credentials(args.stage_tls_ca, args.stage_tls_cert, args.stage_tls_key)


def stage_channel(target: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A channel to another stage of the stack, with this process's stage credentials."""
    return create_channel(target, max_message_bytes=max_message_bytes, credentials=_stage_credentials)


def health_status(
    target: str, service: str = "", timeout: float = 2.0, credentials: grpc.ChannelCredentials | None = None
) -> str:
    """The grpc.health.v1 status name of `target` ("SERVING", "NOT_SERVING", ...) or "UNREACHABLE"
    (`credentials`: TLS, for a stage's main port; the health-only port is plaintext)."""
    channel = (
        create_channel(target, credentials=credentials) if credentials else grpc.insecure_channel(target)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_for_serving(target: str, timeout: float, is_alive: Callable[[], bool] = lambda: True) -> bool:
    """Polls until `target` says SERVING (True) or `timeout` passes / `is_alive()` turns False (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_alive():
        if health_status(target, timeout=1.0) == "SERVING":
            return True
        time.sleep(0.1)
    return False


def die_with_parent() -> None:
    """SIGTERM this process when the one that started it dies, if that was the local stack (unclip.stack sets
    UNCLIP_PARENT_PID): a stage must not outlive `unclip up` or a test. Linux only (prctl)."""
    parent = os.environ.get("UNCLIP_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != int(parent):  # it died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def stage_health_status(target: str, service: str = "", timeout: float = 2.0) -> str:
    """health_status of another stage's main port, with this process's stage credentials."""
    return health_status(target, service, timeout, credentials=_stage_credentials)


def _access(
    name: str, args: argparse.Namespace, front_door: bool
) -> tuple[grpc.ServerCredentials | None, list[grpc.ServerInterceptor]]:
    """This server's TLS credentials and its caller check (unclip.access) from its flags.

    With `--client-ca` every client must present a certificate of that CA (gRPC Python cannot ask for one
    without requiring it). A stage then admits only the services allowed to call it (`--allowed-callers`,
    default unclip.access.interceptor.ALLOWED_CALLERS); the front door (orchestrator) maps the certificate's
    subject to an identity through the keys file (its FrontDoor interceptor).
    """
    if not getattr(args, "tls_cert", None):
        if getattr(args, "client_ca", None):
            raise SystemExit("--client-ca needs --tls-cert and --tls-key")
        return None, []
    from unclip.access.interceptor import StageGuard, allowed_callers
    from unclip.access.tls import server_credentials

    if not args.tls_key:
        raise SystemExit("--tls-cert needs --tls-key")
    credentials = server_credentials(args.tls_cert, args.tls_key, args.client_ca)
    if front_door or not args.client_ca:
        return credentials, []
    callers = allowed_callers(name, args.allowed_callers)
    log.info("%s: mTLS on; callers allowed: %s", name, ", ".join(callers))
    return credentials, [StageGuard(name, callers)]


def _health_only_server(
    name: str, host: str, port: int, health_servicer: health.HealthServicer
) -> grpc.Server:
    """A second, plaintext server with only grpc.health.v1 (the same HealthServicer object, so it says what
    the main port says): for probes that cannot present a client certificate. A second port on the main
    server would expose every service on it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    # The stack (unclip up) reads this line to learn the health port; keep its format.
    print(f"{name} health-only port on {host}:{bound}", flush=True)
    return server


def serve(
    name: str,
    args: argparse.Namespace,
    *,
    register: Callable[[grpc.Server], None],
    service_names: Iterable[str],
    load: Callable[[], None] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    readiness: Callable[[], bool] | None = None,
    readiness_period_s: float = 0.0,
    front_door: bool = False,
) -> int:
    """Runs one service until SIGTERM/SIGINT; returns the process exit status (1 if loading failed).

    `register(server)` adds the servicers (they answer UNAVAILABLE until `load` has finished); `load()` loads
    the weights and runs one warm-up. `args` carries the SERVER_SETTINGS. Started by the local stack, the
    process ends with it (die_with_parent).
    `readiness()`, asked every `readiness_period_s` once loaded, says whether the service can do its work now
    (e.g. the orchestrator: every stage has a SERVING replica). While it says no, the named services say
    NOT_SERVING — what a readiness probe asks — and the overall "" stays SERVING, so a liveness probe does
    not restart a process that a restart would not mend.
    `front_door`: the orchestrator (TLS is optional for its clients; see `_access`).
    """
    die_with_parent()
    configure_stage_channels(args)
    credentials, guard = _access(name, args, front_door)
    tuned = getattr(args, "malloc_tuning", True) and bound_allocator()  # freed memory goes back to the OS
    service_names = list(service_names)
    server, port = create_server(
        f"{args.host}:{args.port}",
        max_message_bytes=args.max_message_bytes,
        max_connection_age_seconds=args.max_connection_age_seconds,
        max_workers=args.max_workers,
        interceptors=[*interceptors, *guard],
        credentials=credentials,
        service_names=service_names,
        name=name,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    register(server)
    extra = []
    if not front_door:  # stages: the orchestrator pauses their batch rows while interactive work runs
        from unclip.runtime import hold

        hold.register(server)
        extra.append(hold.SERVICE_NAME)
    if getattr(args, "reflection", True):  # off in production: it lists every method to any caller
        reflection.enable_server_reflection(
            [*service_names, *extra, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
    for service in ["", *service_names]:
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    # The stack (unclip up) reads this line to learn the port; keep its format.
    print(f"{name} listening on {args.host}:{port}", flush=True)
    health_only = None
    if getattr(args, "health_port", None) is not None:
        health_only = _health_only_server(name, args.host, args.health_port, health_servicer)

    stop = threading.Event()
    failure: list[BaseException] = []

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: %s received, draining", name, signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def load_then_serve() -> None:
        started = time.monotonic()
        try:
            if load is not None:
                load()
        except BaseException as error:  # reported by the main thread, which exits 1
            failure.append(error)
            stop.set()
            return
        for service in ["", *service_names]:
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s: SERVING on port %d (loaded in %.1fs)", name, port, time.monotonic() - started)
        if readiness is not None and readiness_period_s > 0:
            # A thread of its own: this one ends, and with it the OpenMP team the warm-up made.
            threading.Thread(target=watch_readiness, name=f"{name}-readiness", daemon=True).start()

    def watch_readiness() -> None:
        ready = True
        while not stop.wait(readiness_period_s):
            try:
                now_ready = readiness()
            except Exception:  # a failing check means not ready; the next period asks again
                log.exception("%s: readiness check failed", name)
                now_ready = False
            if now_ready != ready:
                ready = now_ready
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if ready
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for service in service_names:
                    health_servicer.set(service, status)
                log.warning(
                    "%s: %s", name, "ready again" if ready else "NOT ready (readiness says NOT_SERVING)"
                )

    threading.Thread(target=load_then_serve, name=f"{name}-load", daemon=True).start()
    ticks = 0
    while not stop.wait(0.5):  # a timed wait so signal handlers run promptly
        ticks += 1
        if tuned and ticks % TRIM_EVERY_TICKS == 0:
            trim()  # free heap pages back to the OS, so RSS follows the load down

    health_servicer.enter_graceful_shutdown()
    server.stop(args.grace_seconds).wait()
    if health_only is not None:
        health_only.stop(None)
    if failure:
        error = failure[0]
        log.error("%s failed to start: %s: %s", name, type(error).__name__, error, exc_info=error)
        print(f"{name} failed to start: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    log.info("%s stopped", name)
    return 0


def configure_logging(name: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
