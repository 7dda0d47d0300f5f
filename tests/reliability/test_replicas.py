"""Replicas reached through a list of addresses and through real name resolution, and a replicated second
upsampler, with real processes and real gRPC:

0. `a|b` targets: the orchestrator sends each call to the replica with fewer calls outstanding (each
   replica's own request counter shows where the calls went).
1. `dns:` targets: two decoder replicas share one port on two loopback addresses (127.0.0.1, 127.0.0.2),
   and one DNS name resolves to both (a small DNS server on loopback, queried by gRPC's c-ares resolver
   through the target's authority: `dns://127.0.0.1:<dns port>/decoder.unclip.test:<port>`). An
   orchestrator given only that name spreads decoder calls over both (each replica's own request counter
   shows it) and loses no request when one replica is SIGKILLed during concurrent load.
2. The two-upsampler cascade (64 -> 128 px) with two replicas of the second upsampler, started as
   `unclip up --replicas super_res_2=2` starts them: SIGKILL one during load, no request fails.

One stack (tiny model, two upsampler stages) serves the module; two decoders of the module's own (with
metrics ports) serve tests 0 and 1, each with an orchestrator of its own. Every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from dns_server import DnsServer  # tests/reliability/dns_server.py (pytest puts this folder on sys.path)

from unclip.runtime.server import create_channel, health_status
from unclip.stack import Process, Stack, parse_replicas
from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc

pytestmark = pytest.mark.timeout(900)

DNS_NAME = "decoder.unclip.test"


def request(seed: int, decoder_steps: int = 30, super_res_steps: int = 2) -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(
        prompt="a red circle",
        n=1,
        seed=seed,
        user=f"load{seed}",  # distinct callers: the per-caller limit stays out of the way
        params=orchestrator_pb2.SamplingParams(
            prior_num_inference_steps=2,
            decoder_num_inference_steps=decoder_steps,
            super_res_num_inference_steps=[super_res_steps],  # one value: every upsampler stage
        ),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from unclip.tiny import make_tiny_model

    model = make_tiny_model(
        tmp_path_factory.mktemp("replicas") / "model", super_res_stages=2, variation=False
    )
    stack = Stack(
        model=str(model),
        port=0,
        log_dir=tmp_path_factory.mktemp("replicas-logs"),
        grace_seconds=30,
        replicas=parse_replicas("super_res_2=2"),  # what `unclip up --replicas super_res_2=2` passes
        extra_env={"UNCLIP_TORCH_THREADS": "1"},
        tls=False,  # its own decoder / safety replicas and orchestrators join these stages in plaintext
    )
    stack.start(timeout=300)
    yield stack
    stack.stop()


def process(stack: Stack, name: str) -> Process:
    return next(p for p in stack.processes if p.name == name)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start(name: str, argv: list[str], log_dir: Path) -> Process:
    env = {**os.environ, "UNCLIP_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = Process(name=name, argv=[sys.executable, "-m", *argv], log_path=log_dir / f"{name}.log")
    started.start(env)
    return started


def _wait_serving(processes: list[Process], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for p in processes:
        while not (p.poll_address() and health_status(p.address, timeout=1.0) == "SERVING"):
            assert p.alive(), p.failure()
            assert time.monotonic() < deadline, f"{p.name} not SERVING: {p.log_tail()}"
            time.sleep(0.2)


def _requests_computed(metrics_port: int, service: str) -> int:
    """Requests the stage's engine worked on (its unclip_batch_size histogram counts one per request)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "unclip_batch_size_count" and sample.labels.get("service") == service
        )
    )


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks (100 Hz)


def _wait_busy(victim: Process, timeout: float = 60) -> None:
    """Until the process computes (its CPU time grows): requests are in flight on it."""
    start, deadline = _cpu_seconds(victim.popen.pid), time.monotonic() + timeout
    while _cpu_seconds(victim.popen.pid) - start < 0.2:
        assert time.monotonic() < deadline, f"{victim.name} never got busy"
        time.sleep(0.05)


def _load(stub, seeds, **kwargs):
    """Concurrent requests; a pool and futures of (seed, "ok" or the error)."""

    def one(seed):
        try:
            reply = stub.Generate(request(seed, **kwargs), timeout=300)
            return seed, "ok" if len(reply.images) == 1 else f"{len(reply.images)} images"
        except grpc.RpcError as error:
            return seed, f"{error.code().name}: {error.details()}"

    pool = concurrent.futures.ThreadPoolExecutor(len(seeds))
    return pool, [pool.submit(one, seed) for seed in seeds]


def test_replicas_flag():
    """`unclip up --replicas`: "upsampler" stands for every upsampler stage, a stage may be named alone, and a
    bad value is a usage error (exit 2) naming the part."""
    assert parse_replicas("decoder=2,upsampler=3") == {"decoder": 2, "super_res": 3, "super_res_2": 3}
    assert parse_replicas("super_res_2=2") == {"super_res_2": 2}
    assert parse_replicas("upsampler=2,super_res_2=4") == {"super_res": 2, "super_res_2": 4}
    for bad, named in (("super_res_3=2", "super_res_3"), ("decoder=9", "decoder"), ("decoder", "decoder")):
        with pytest.raises(ValueError, match=named):
            parse_replicas(bad)
    import subprocess

    cli = subprocess.run(
        [sys.executable, "-m", "unclip", "up", "--model", "unused", "--replicas", "super_res_3=2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 2 and "--replicas" in cli.stderr and "super_res_3" in cli.stderr, cli.stderr


@pytest.fixture(scope="module")
def decoders(stack, tmp_path_factory):
    """Two decoder replicas on one port, one per loopback address (127.0.0.1, 127.0.0.2), each with its own
    metrics port: (processes, {name: metrics port}, port). The first takes a free port on 127.0.0.1
    (announced before it loads its weights); the second the same port on 127.0.0.2, where nothing else
    listens. The dns test, the last to use them, SIGKILLs one."""
    log_dir = tmp_path_factory.mktemp("decoders")
    metrics = {"decoder-a": _free_port(), "decoder-b": _free_port()}

    def decoder(name: str, host: str, port: int) -> Process:
        return _start(
            name,
            ["services.decoder", "--model", stack.model, "--stage", "decoder", "--host", host,
             "--port", str(port), "--metrics-port", str(metrics[name]), "--metrics-host", "127.0.0.1"],
            log_dir,
        )  # fmt: skip

    started = [decoder("decoder-a", "127.0.0.1", 0)]
    try:
        deadline = time.monotonic() + 120
        while started[0].poll_address() is None:
            assert started[0].alive() and time.monotonic() < deadline, started[0].log_tail()
            time.sleep(0.1)
        port = int(started[0].address.rsplit(":", 1)[1])
        started.append(decoder("decoder-b", "127.0.0.2", port))
        _wait_serving(started)
        yield started, metrics, port
    finally:
        for p in started:
            if p.alive():
                p.popen.terminate()
                p.popen.wait(timeout=60)


def _orchestrator(stack: Stack, name: str, decoder_addr: str, log_dir: Path) -> Process:
    """An orchestrator of the module's stack with its own decoder target."""
    upsamplers = [  # the live replicas (a test of this module SIGKILLs one)
        "|".join(p.address for p in stack.processes if p.name.split("#")[0] == stage and p.alive())
        for stage in ("super_res", "super_res_2")
    ]
    started = _start(
        name,
        ["services.orchestrator", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--encoder-addr", process(stack, "encoder").address,
         "--prior-addr", process(stack, "prior").address,
         "--decoder-addr", decoder_addr,
         "--upsampler-addrs", ",".join(upsamplers),
         "--safety-addr", process(stack, "safety").address],
        log_dir,
    )  # fmt: skip
    _wait_serving([started])
    return started


def test_calls_go_to_the_replica_with_fewer_outstanding(stack, decoders, tmp_path):
    """An orchestrator given two decoder addresses (`a|b`) sends each call to the replica with fewer calls
    outstanding: while one replica works on a long request, the short requests that follow all go to the
    other (round-robin would send every second one to the busy replica)."""
    processes, metrics, port = decoders
    orchestrator = _orchestrator(stack, "orchestrator-lor", f"127.0.0.1:{port}|127.0.0.2:{port}", tmp_path)
    channel = create_channel(orchestrator.address)
    try:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        assert len(stub.Generate(request(98, decoder_steps=2), timeout=120).images) == 1  # connections up
        assert len(stub.Generate(request(97, decoder_steps=2), timeout=120).images) == 1
        cpu = {p.name: _cpu_seconds(p.popen.pid) for p in processes}
        long = stub.Generate.future(request(96, decoder_steps=1000), timeout=300)
        deadline = time.monotonic() + 60
        while not (busy := [p.name for p in processes if _cpu_seconds(p.popen.pid) - cpu[p.name] >= 0.3]):
            assert time.monotonic() < deadline and not long.done(), "no decoder replica got busy"
            time.sleep(0.05)
        (busy_name,) = busy
        idle_name = next(name for name in metrics if name != busy_name)
        before = {name: _requests_computed(metrics_port, "decoder") for name, metrics_port in metrics.items()}
        for seed in range(4):
            assert len(stub.Generate(request(seed, decoder_steps=2), timeout=120).images) == 1
        after = {name: _requests_computed(metrics_port, "decoder") for name, metrics_port in metrics.items()}
        assert not long.done(), "the long request ended before the short ones: make it longer"
        long.cancel()
        assert after[idle_name] - before[idle_name] == 4, (before, after, busy_name)
        assert after[busy_name] - before[busy_name] <= 1, (before, after, busy_name)  # at most the long one
    finally:
        channel.close()
        orchestrator.popen.terminate()
        orchestrator.popen.wait(timeout=60)


def test_dns_name_spreads_calls_and_survives_a_sigkill(stack, decoders, tmp_path):
    # One DNS name with both replicas' A records reaches both.
    processes, metrics, port = decoders
    orchestrator = None
    with DnsServer({DNS_NAME: ["127.0.0.1", "127.0.0.2"]}) as dns:
        try:
            target = f"dns://{dns.address}/{DNS_NAME}:{port}"
            orchestrator = _orchestrator(stack, "orchestrator-dns", target, tmp_path)
            assert (DNS_NAME, 1) in dns.queries  # resolved through the DNS server (A records)

            channel = create_channel(orchestrator.address)
            stub = orchestrator_pb2_grpc.ImageServiceStub(channel)

            # (a) sequential calls alternate over both replicas (round_robin over the resolved addresses, once
            # both connections are up: the first call warms them)
            assert len(stub.Generate(request(99, decoder_steps=2), timeout=120).images) == 1
            before = {name: _requests_computed(port_, "decoder") for name, port_ in metrics.items()}
            for seed in range(6):
                assert len(stub.Generate(request(seed, decoder_steps=3), timeout=120).images) == 1
            spread = {
                name: _requests_computed(port_, "decoder") - before[name] for name, port_ in metrics.items()
            }
            assert sum(spread.values()) == 6 and min(spread.values()) >= 2, spread

            # (b) SIGKILL one replica while both have requests in flight: the orchestrator retries through the
            # same name, gRPC picks the live address, no request fails.
            victim = processes[1]
            pool, futures = _load(stub, seeds=range(100, 104), decoder_steps=60)
            _wait_busy(victim)
            victim.popen.kill()
            outcomes = [f.result(timeout=300) for f in futures]
            _, more = _load(stub, seeds=range(200, 204), decoder_steps=5)  # after the kill: all to the other
            outcomes += [f.result(timeout=300) for f in more]
            pool.shutdown()
            assert all(outcome == "ok" for _, outcome in outcomes), outcomes
            log = orchestrator.log_path.read_text()
            assert f"from {target}, retrying on another replica" in log, log[-3000:]
            channel.close()
        finally:
            if orchestrator is not None and orchestrator.alive():
                orchestrator.popen.terminate()
                orchestrator.popen.wait(timeout=60)


def test_replicated_second_upsampler_survives_a_sigkill(stack):
    replicas = [p for p in stack.processes if p.name.split("#")[0] == "super_res_2"]
    assert [p.name for p in replicas] == ["super_res_2", "super_res_2#2"]
    assert all(p.alive() for p in replicas)
    orchestrator_log = process(stack, "orchestrator").log_path
    channel = stack.channel()  # with the stack's API key
    stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
    reply = stub.Generate(request(1, decoder_steps=2), timeout=120)
    import io

    import PIL.Image

    assert PIL.Image.open(io.BytesIO(reply.images[0].png)).size == (128, 128)  # the cascade: 32 -> 64 -> 128

    victim = replicas[1]
    # Longer upsampler work (the second stage at 128 px) so the kill lands while calls are in flight on it.
    pool, futures = _load(stub, seeds=range(300, 304), decoder_steps=2, super_res_steps=15)
    _wait_busy(victim)
    victim.popen.kill()
    outcomes = [f.result(timeout=300) for f in futures]
    pool.shutdown()
    assert all(outcome == "ok" for _, outcome in outcomes), outcomes
    log = orchestrator_log.read_text()
    assert f"from {victim.address}, retrying on another replica" in log, log[-3000:]
    assert replicas[0].alive()
    channel.close()


def _readiness(address: str) -> tuple[str, str]:
    """(liveness, readiness): the health of "" and of the named service a readiness probe asks."""
    return health_status(address, timeout=2.0), health_status(address, "unclip.v1.ImageService", timeout=2.0)


def _wait_readiness(address: str, expected: tuple[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (seen := _readiness(address)) != expected:
        assert time.monotonic() < deadline, f"orchestrator health {seen}, expected {expected}"
        time.sleep(0.2)


def test_orchestrator_readiness_follows_its_stages(stack, tmp_path):
    """The orchestrator's readiness (health service unclip.v1.ImageService, what the k8s readinessProbe asks)
    says NOT_SERVING while a stage has no SERVING replica and SERVING again once one is back; liveness ("")
    stays SERVING throughout, so a liveness probe does not restart it for a fault elsewhere. Two safety
    replicas of its own: losing one keeps it ready, losing both does not, one back on its port mends it."""

    def safety(name: str, port: int) -> Process:
        return _start(
            name,
            ["services.safety", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
             "--audit-dir", str(tmp_path / f"audit-{name}")],
            tmp_path,
        )  # fmt: skip

    safeties = [safety("safety-a", _free_port()), safety("safety-b", _free_port())]
    orchestrator = None
    try:
        _wait_serving(safeties)
        upsamplers = [  # the live replicas (an earlier test of this module SIGKILLs one)
            "|".join(p.address for p in stack.processes if p.name.split("#")[0] == stage and p.alive())
            for stage in ("super_res", "super_res_2")
        ]
        orchestrator = _start(
            "orchestrator-readiness",
            ["services.orchestrator", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
             "--stage-health-period-seconds", "0.3",
             "--encoder-addr", process(stack, "encoder").address,
             "--prior-addr", process(stack, "prior").address,
             "--decoder-addr", process(stack, "decoder").address,
             "--upsampler-addrs", ",".join(upsamplers),
             "--safety-addr", "|".join(p.address for p in safeties)],
            tmp_path,
        )  # fmt: skip
        _wait_serving([orchestrator])
        _wait_readiness(orchestrator.address, ("SERVING", "SERVING"))
        stub = orchestrator_pb2_grpc.ImageServiceStub(create_channel(orchestrator.address))

        safeties[0].popen.kill()  # one replica left: still ready, and requests still succeed
        safeties[0].popen.wait(timeout=30)
        time.sleep(1.0)  # a few watch periods
        assert _readiness(orchestrator.address) == ("SERVING", "SERVING")
        assert len(stub.Generate(request(7, decoder_steps=2), timeout=120).images) == 1

        port_b = safeties[1].address.rsplit(":", 1)[1]
        safeties[1].popen.kill()  # no safety replica: not ready, but alive
        safeties[1].popen.wait(timeout=30)
        _wait_readiness(orchestrator.address, ("SERVING", "NOT_SERVING"))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(request(8, decoder_steps=2), timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value

        safeties[1] = safety("safety-b2", int(port_b))  # back on the same port: ready again
        _wait_serving([safeties[1]])
        _wait_readiness(orchestrator.address, ("SERVING", "SERVING"))
        # The orchestrator's own channel reconnects within its backoff (at most 2 s, create_channel).
        deadline = time.monotonic() + 15
        while True:
            try:
                assert len(stub.Generate(request(9, decoder_steps=2), timeout=120).images) == 1
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, error
                time.sleep(0.5)
    finally:
        for p in [*safeties, *([orchestrator] if orchestrator else [])]:
            if p.alive():
                p.popen.terminate()
                p.popen.wait(timeout=60)
