"""Overload: far more calls in flight than the server can answer, for tens of seconds.

    python -m medserve.perf.bench_overload                       # about a minute on 2 cores
    python -m medserve.perf.bench_overload --in-flight 1024 --seconds 30

One `medserve serve` started here with the random forest of the demo repository, batching off
and a queue cap of 256 (`--max-queue-size`). First its saturation throughput (a closed loop of
16 calls, no deadline); then `--in-flight` calls at once from one load process of the
harness's pool (raw HTTP/2, 8 connections; a caller refused with RESOURCE_EXHAUSTED waits the
server's retry hint), each with a 1 s deadline, for `--seconds`. Reported: every status seen (the documented ones only: OK,
RESOURCE_EXHAUSTED with its retry hint, DEADLINE_EXCEEDED, UNAVAILABLE; a CANCELLED or another
one is a failure of the run), goodput (OK answers within the deadline per second) against the
saturation throughput (target >= 0.8), and the server's resident memory each second (flat:
the last third's peak within 10 % of the first third's).
"""
from __future__ import annotations

import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np

from .loadgen import Job, LoadPool
from .measure import rss_mib, status_name
from .report import bench_parser, write_result
from .serverproc import ServerHandle, medserve

DOCUMENTED = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}
CHANNELS = 8


class Load(NamedTuple):
    """What one load phase saw."""

    statuses: collections.Counter[str]
    details: dict[str, str]  # the first message of each status (statuses never carry tensor values)
    good: int  # OK answers within the deadline
    rss_mb: list[float]  # the server's resident memory, each second


def _load(pool: LoadPool, server: ServerHandle, request: bytes, in_flight: int, seconds: float,
          timeout_s: float | None) -> Load:
    """`in_flight` callers back to back from one load process of the shared pool (each waits
    the server's retry pushback after RESOURCE_EXHAUSTED, as a well-behaved client does), while
    the server's RSS is read each second. A server-side cancel at the deadline counts as
    DEADLINE_EXCEEDED (rawh2, the load process's transport, reads it so)."""
    goal = None if timeout_s is None else int(timeout_s * 1e9)
    job = Job(address=server.address, mode="closed", concurrency=in_flight, rate=0.0, arrival="fixed", phase_s=0.0,
              warmup_s=0.0, measure_s=seconds, drain_s=(timeout_s or 30.0) + 5.0, bodies=((request,),),
              timeouts_s=(timeout_s,), goals_ns=(goal,), plan=bytes(1), channels=CHANNELS,
              max_outstanding=in_flight, seed=0, back_off=True)
    start_ns = pool.start([job])
    end_ns = start_ns + int(seconds * 1e9)
    rss: list[float] = []
    while (now := time.monotonic_ns()) < end_ns:
        rss.append(rss_mib([server.pid]))
        time.sleep(min(1.0, (end_ns - now) / 1e9))
    (run,) = pool.collect()
    codes, counts = np.unique(run["status"], return_counts=True)
    statuses = collections.Counter({status_name(int(c)): int(n) for c, n in zip(codes, counts, strict=True)})
    details = {status_name(code): message for code, message in run["messages"].items()}
    return Load(statuses, details, run["window_good"], rss)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench_overload", __doc__)
    parser.add_argument("--in-flight", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--deadline-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    from medserve.exporters.demo import build_demo_repository
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos.wire import to_raw

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="medserve-bench-overload-") as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repository(repo, models=["breast_cancer_rf"])
        config = repo / "breast_cancer_rf" / "config.pbtxt"
        text = config.read_text()
        config.write_text(text[: text.index("dynamic_batching")] if "dynamic_batching" in text else text)
        request = pb.ModelInferRequest(model_name="breast_cancer_rf")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 30])
        request.raw_input_contents.append(to_raw(np.full((1, 30), 10.0, np.float32)))
        with (medserve(repo, args=("--max-queue-size", "256"), log_dir=Path(tmp)) as server,
              LoadPool(1) as pool):
            meta_input = _first_input(server.address)
            request.inputs[0].name = meta_input
            body = request.SerializeToString()
            sat = _load(pool, server, body, 16, 5.0, None)
            saturation = sat.good / 5.0
            load = _load(pool, server, body, args.in_flight, args.seconds, args.deadline_s)
    statuses, details, good, rss = load.statuses, load.details, load.good, load.rss_mb
    goodput = good / args.seconds
    third = max(1, len(rss) // 3)
    flat = max(rss[-third:]) <= 1.1 * max(rss[:third]) if rss else False
    unexpected = sorted(set(statuses) - DOCUMENTED)
    print(f"saturation (16 in flight, no deadline): {saturation:.0f} req/s  ({dict(sat.statuses)})")
    print(f"overload ({args.in_flight} in flight, {args.deadline_s:g} s deadlines, {args.seconds:g} s):")
    print(f"  statuses: {dict(statuses)}{'  UNDOCUMENTED: ' + str(unexpected) if unexpected else ''}")
    for code, detail in sorted(details.items()):
        print(f"    {code}: {detail}")
    print(f"  goodput {goodput:.0f} req/s = {goodput / saturation:.2f} x saturation (target >= 0.8)")
    print(f"  server RSS MB each second: {[round(r) for r in rss]}  ({'flat' if flat else 'GROWING'})")
    path = write_result("bench_overload", {
        "saturation_rps": saturation, "statuses": dict(statuses), "details": details, "goodput_rps": goodput,
        "goodput_ratio": goodput / saturation, "rss_mb": rss, "flat": flat, "args": vars(args) | {"out": str(args.out)},
    }, started_unix=started, out_dir=args.out)
    print(f"results: {path}")
    return 0 if not unexpected else 1


def _first_input(target: str) -> str:
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name="breast_cancer_rf"))
    return meta.inputs[0].name


if __name__ == "__main__":
    sys.exit(main())
