"""Soak (and chaos): mixed traffic at ~80 % of the stack's capacity for a long time, every process's RSS
sampled; with --chaos, two replicas of each stage and one of them SIGKILLed in turn during the run.

    python -m benchmarks.soak [--model DIR] [--minutes 30] [--load 0.8] [--chaos] [--out-dir runs/soak]

1. Calibration (--calibrate-seconds): closed-loop traffic of the same mix from --clients threads measures the
   capacity (requests per second).
2. Soak: requests arrive at --load x capacity (Poisson), from a bounded pool of threads: generate, vary,
   edit, GenerateStream read to the end, generate cancelled mid-way, and prompts the content policy refuses.
3. With --chaos, one replica of each stage (encoder, prior, decoder, upsamplers, safety) is SIGKILLed in turn,
   evenly spaced over the run, and started again on its port --restart-after seconds later (as its Deployment
   would replace the pod; the load was calibrated with both replicas up). A request that fails with
   UNAVAILABLE is counted as "lost to a kill".
Outcomes: `ok`, `refused` (the intended refusals), `cancelled` (the intended cancellations), `unavailable`,
and `failed` (anything else: the count that must be 0). Every request id answered OK must have its audit
records (the final-output check) in the safety service's audit log. RSS: growth over the last 20 minutes (or
the last two thirds of a shorter run) per process that was not killed; the curve is written as a PNG.
Prints JSON lines; the summary also goes to <out-dir>/soak.json and the plot to <out-dir>/soak-rss.png.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import PIL.Image

from benchmarks.common import emit, environment, model_dir, start_stack
from unclip.fuzz import rss_mb

STAGES = ("encoder", "prior", "decoder", "super_res", "super_res_2", "safety")
MIX = {"generate": 0.35, "vary": 0.15, "edit": 0.15, "stream": 0.15, "cancel": 0.1, "refuse": 0.1}


def _png(mode: str, hole: bool = False) -> bytes:
    array = np.random.default_rng(0).integers(0, 256, (64, 64, len(mode)), dtype=np.uint8)
    if hole:
        array[..., 3] = 255
        array[:32, :32, 3] = 0
    buffer = io.BytesIO()
    PIL.Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


class Traffic:
    """One request of each kind, and its outcome."""

    def __init__(self, channel: grpc.Channel, steps: tuple[int, int, int]):
        from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc

        self.pb = orchestrator_pb2
        self.stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        self.params = orchestrator_pb2.SamplingParams(
            prior_num_inference_steps=steps[0],
            decoder_num_inference_steps=steps[1],
            super_res_num_inference_steps=[steps[2]],
        )
        self.image, self.rgba = _png("RGB"), _png("RGBA", hole=True)

    def send(self, kind: str, seed: int) -> tuple[str, str]:
        """(outcome, request id or "")."""
        pb, common = self.pb, dict(n=1, seed=seed, params=self.params, user=f"soak-{seed % 7}")
        try:
            if kind == "generate":
                reply = self.stub.Generate(pb.GenerateRequest(prompt="a red circle", **common), timeout=300)
            elif kind == "vary":
                reply = self.stub.CreateVariation(
                    pb.VariationRequest(image=self.image, **common), timeout=300
                )
            elif kind == "edit":
                reply = self.stub.Edit(
                    pb.EditRequest(image=self.rgba, prompt="a star", **common), timeout=300
                )
            elif kind == "stream":
                reply = None
                for event in self.stub.GenerateStream(
                    pb.GenerateRequest(prompt="a circle", **common), timeout=300
                ):
                    if event.HasField("result"):
                        reply = event.result
            elif kind == "cancel":
                future = self.stub.Generate.future(
                    pb.GenerateRequest(prompt="a blue square", **common), timeout=300
                )
                time.sleep(random.uniform(0.05, 0.5))
                future.cancel()
                try:
                    reply = future.result()
                except grpc.FutureCancelledError:
                    return "cancelled", ""
            else:  # refuse
                self.stub.Generate(
                    pb.GenerateRequest(prompt="a massacre in the street", **common), timeout=300
                )
                return "failed", ""  # the policy should have refused it
        except grpc.RpcError as error:
            code = error.code()
            if kind == "refuse" and code == grpc.StatusCode.INVALID_ARGUMENT:
                return "refused", ""
            if code == grpc.StatusCode.UNAVAILABLE:
                return "unavailable", ""
            return "failed", f"{kind}: {code.name}: {(error.details() or '')[:200]}"
        return "ok", reply.request_id if reply is not None else ""


def calibrate(traffic: Traffic, clients: int, seconds: float) -> float:
    """Requests per second of the mix, closed loop from `clients` threads."""
    done, stop_at, lock = [0], time.monotonic() + seconds, threading.Lock()

    def client(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < stop_at:
            kind = rng.choices(list(MIX), list(MIX.values()))[0]
            if traffic.send(kind, rng.randrange(2**31))[0] in ("ok", "refused", "cancelled"):
                with lock:
                    done[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.monotonic() - started)


def audited_request_ids(audit_dir: Path) -> set[str]:
    from services.safety.audit import read_records

    return {r.get("request_id", "") for r in read_records(str(audit_dir)) if r.get("event") == "decision"}


def growth(samples: list[dict], window_minutes: float, killed: set[str]) -> dict[str, float]:
    """Per process not killed: RSS growth (%) from the start of the last `window_minutes` to the end, each
    end the mean of its first / last 10 % of samples in the window."""
    end = samples[-1]["minute"]
    window = [s for s in samples if s["minute"] >= end - window_minutes]
    k = max(1, len(window) // 10)
    out = {}
    for name in samples[0]["rss_mb"]:
        if name in killed:
            continue
        first = sum(s["rss_mb"].get(name, 0) for s in window[:k]) / k
        last = sum(s["rss_mb"].get(name, 0) for s in window[-k:]) / k
        out[name] = round(100 * (last - first) / first, 2) if first else 0.0
    return out


def plot(samples: list[dict], kills: list[tuple[float, str]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 13 processes with two replicas: one colour each
    for name in samples[0]["rss_mb"]:
        points = [(s["minute"], s["rss_mb"][name]) for s in samples if s["rss_mb"].get(name)]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1)
    for minute, name in kills:
        ax.axvline(minute, color="grey", linestyle=":", linewidth=1)
        ax.text(minute, ax.get_ylim()[1], f" kill {name}", rotation=90, va="top", fontsize=7)
    ax.set_xlabel("minute")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    parser.add_argument("--clients", type=int, default=3, help="closed-loop clients of the calibration")
    parser.add_argument("--calibrate-seconds", type=float, default=90.0)
    parser.add_argument("--steps", default="4,4,2", help="prior,decoder,super-res steps of every request")
    parser.add_argument("--sample-seconds", type=float, default=15.0)
    parser.add_argument("--chaos", action="store_true", help="two replicas per stage, one SIGKILLed in turn")
    parser.add_argument(
        "--restart-after",
        type=float,
        default=20.0,
        help="seconds after a SIGKILL to start the killed replica again on its port (0: never)",
    )
    parser.add_argument("--out-dir", default="runs/soak")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = tuple(int(s) for s in args.steps.split(","))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from unclip.tiny import make_tiny_model

    if args.model:
        model = model_dir(args.model)
    else:
        import tempfile

        model = make_tiny_model(
            Path(tempfile.mkdtemp(prefix="unclip-soak-")) / "model", super_res_stages=2, variation=True
        )
    replicas = {stage: 2 for stage in STAGES} if args.chaos else {}
    # All the traffic comes from one key (the stack's): the soak measures the stack's capacity, so the
    # per-caller cap is the service's own in-flight limit (else bursts from one key are refused by design).
    stack = start_stack(model, replicas=replicas, extra_env={"UNCLIP_MAX_INFLIGHT_PER_CALLER": "16"})
    emit({"benchmark": "soak", **environment(), "minutes": args.minutes, "load": args.load, "steps": steps,
          "chaos": args.chaos, "processes": [p.name for p in stack.processes]})  # fmt: skip
    try:
        traffic = Traffic(stack.channel("orchestrator"), steps)  # with the stack's key
        capacity = calibrate(traffic, args.clients, args.calibrate_seconds)
        rate = args.load * capacity
        emit({"capacity_rps": round(capacity, 3), "rate_rps": round(rate, 3)})
        outcomes, errors, ok_ids, lock = Counter(), [], [], threading.Lock()
        rng = random.Random(args.seed)
        pool = ThreadPoolExecutor(max_workers=16)
        inflight = threading.Semaphore(16)

        def one(kind: str, seed: int) -> None:
            try:
                outcome, detail = traffic.send(kind, seed)
                with lock:
                    outcomes[outcome] += 1
                    if outcome == "ok" and detail:
                        ok_ids.append(detail)
                    elif outcome == "failed" and len(errors) < 50:
                        errors.append(detail)
            finally:
                inflight.release()

        began = time.monotonic()
        stop_at = began + 60 * args.minutes
        kill_plan = []
        if args.chaos:
            present = [s for s in STAGES if any(p.name == f"{s}#2" for p in stack.processes)]
            spacing = 60 * args.minutes / (len(present) + 1)
            kill_plan = [(began + spacing * (i + 1), f"{stage}#2") for i, stage in enumerate(present)]
        kills: list[tuple[float, str]] = []
        restarts: list[tuple[float, str]] = []  # (when, name): killed replicas to start again
        restarted: list[tuple[float, str]] = []  # (minute it served again, name)

        def serving_again(name: str) -> None:
            stack.wait_serving(name)
            restarted.append((round((time.monotonic() - began) / 60, 2), name))
            emit({"minute": restarted[-1][0], "serving_again": name})

        samples: list[dict] = []
        next_sample = began
        next_arrival = began
        while time.monotonic() < stop_at:
            now = time.monotonic()
            if now >= next_sample:
                alive = {p.name: round(rss_mb(p.popen.pid), 1) for p in stack.processes if p.alive()}
                with lock:
                    sample = {"minute": round((now - began) / 60, 2), "rss_mb": alive, **dict(outcomes)}
                samples.append(sample)
                emit(sample)
                next_sample += args.sample_seconds
            if kill_plan and now >= kill_plan[0][0]:
                _, name = kill_plan.pop(0)
                victim = next(p for p in stack.processes if p.name == name)
                os.kill(victim.popen.pid, signal.SIGKILL)
                kills.append((round((now - began) / 60, 2), name))
                emit({"minute": kills[-1][0], "sigkill": name})
                if args.restart_after > 0:
                    restarts.append((now + args.restart_after, name))
            if restarts and now >= restarts[0][0]:
                _, name = restarts.pop(0)
                # Started from this thread, which lives as long as the stack (the child's parent-death
                # signal follows the thread that started it); waited for on another.
                stack.restart(name, wait=False)
                threading.Thread(target=serving_again, args=(name,), daemon=True).start()
            if now >= next_arrival:
                if inflight.acquire(blocking=False):
                    kind = rng.choices(list(MIX), list(MIX.values()))[0]
                    pool.submit(one, kind, rng.randrange(2**31))
                else:
                    with lock:
                        outcomes["skipped (16 in flight)"] += 1
                next_arrival += rng.expovariate(rate)
            time.sleep(max(0.0, min(next_arrival, next_sample) - time.monotonic()))
        pool.shutdown(wait=True)
        time.sleep(2)  # the audit log's last lines
        audited = audited_request_ids(stack.log_dir / "audit")
        missing = [rid for rid in ok_ids if rid not in audited]
        killed = {name for _, name in kills}
        window = 20.0 if args.minutes >= 25 else 2 * args.minutes / 3
        summary = {
            "capacity_rps": round(capacity, 3),
            "rate_rps": round(rate, 3),
            "outcomes": dict(outcomes),
            "failed_examples": errors[:10],
            "kills": kills,
            "restarted": restarted,
            "ok_requests": len(ok_ids),
            "ok_requests_missing_from_audit": len(missing),
            "rss_growth_pct_last_window": growth(samples, window, killed),
            "window_minutes": window,
            "dead_unplanned": [p.name for p in stack.processes if not p.alive() and p.name not in killed],
        }
        emit(summary)
        (out_dir / "soak.json").write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))
        chaos = " with SIGKILLs" if args.chaos else ""
        title = f"soak {args.minutes:g} min at {args.load:.0%} of capacity{chaos}"
        plot(samples, kills, out_dir / "soak-rss.png", title)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
