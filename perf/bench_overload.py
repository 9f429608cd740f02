"""Overload: far more calls in flight than the server can answer, for tens of seconds.

    python -m medserve.perf.bench_overload                       # about a minute on 2 cores
    python -m medserve.perf.bench_overload --in-flight 1024 --seconds 30

One `medserve serve` started here with the random forest of the demo repository, batching off
and a queue cap of 256 (`--max-queue-size`). First its saturation throughput (a closed loop of
16 calls, no deadline); then `--in-flight` calls at once from one grpc.aio process, each with a
1 s deadline, for `--seconds`. Reported: every status seen (the documented ones only: OK,
RESOURCE_EXHAUSTED with its retry hint, DEADLINE_EXCEEDED, UNAVAILABLE; a CANCELLED or another
one is a failure of the run), goodput (OK answers within the deadline per second) against the
saturation throughput (target >= 0.8), and the server's resident memory each second (flat:
the last third's peak within 10 % of the first third's).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np

from .serverproc import medserve

DOCUMENTED = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Load(NamedTuple):
    """What one load phase saw."""

    statuses: collections.Counter[str]
    details: dict[str, str]  # the first message of each status (statuses never carry tensor values)
    good: int  # OK answers within the deadline
    rss_mb: list[float]  # the server's resident memory, each second
    cancelled_past_deadline: int  # CANCELLED after the deadline, counted as DEADLINE_EXCEEDED


async def _load(target: str, request: bytes, in_flight: int, seconds: float, timeout_s: float | None,
                pid: int) -> Load:
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos import grpc_service_pb2_grpc as pb_grpc

    statuses: collections.Counter[str] = collections.Counter()
    details: dict[str, str] = {}
    good = late = 0
    rss: list[float] = []
    end = time.perf_counter() + seconds
    message = pb.ModelInferRequest.FromString(request)
    channels = [grpc.aio.insecure_channel(target) for _ in range(8)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]

    async def caller(i: int) -> None:
        nonlocal good, late
        stub = stubs[i % len(stubs)]
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                await stub.ModelInfer(message, timeout=timeout_s)
                statuses["OK"] += 1
                if timeout_s is None or time.perf_counter() - t0 <= timeout_s:
                    good += 1
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                if code == "CANCELLED" and timeout_s is not None and time.perf_counter() - t0 >= timeout_s:
                    # the server's deadline timer reset the stream before this overloaded client's
                    # own timer fired; medserve's client library reports it as DEADLINE_EXCEEDED
                    code = "DEADLINE_EXCEEDED"
                    late += 1
                statuses[code] += 1
                details.setdefault(code, str(err.details())[:160])
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    pushback = dict(err.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    await asyncio.sleep(int(pushback) / 1e3 if pushback else 0.005)

    async def sample() -> None:
        while time.perf_counter() < end:
            rss.append(_rss_mb(pid))
            await asyncio.sleep(1.0)

    await asyncio.gather(sample(), *(caller(i) for i in range(in_flight)))
    for c in channels:
        await c.close()
    return Load(statuses, details, good, rss, late)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medserve.perf.bench_overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-flight", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--deadline-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from medserve.exporters.demo import build_demo_repository
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos.wire import to_raw

    with tempfile.TemporaryDirectory(prefix="medserve-bench-overload-") as tmp:
        repo = Path(tmp) / "repo"
        build_demo_repository(repo, models=["breast_cancer_rf"])
        config = repo / "breast_cancer_rf" / "config.pbtxt"
        text = config.read_text()
        config.write_text(text[: text.index("dynamic_batching")] if "dynamic_batching" in text else text)
        request = pb.ModelInferRequest(model_name="breast_cancer_rf")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 30])
        request.raw_input_contents.append(to_raw(np.full((1, 30), 10.0, np.float32)))
        with medserve(repo, args=("--max-queue-size", "256"), log_dir=Path(tmp)) as server:
            meta_input = _first_input(server.address)
            request.inputs[0].name = meta_input
            body = request.SerializeToString()
            sat = asyncio.run(_load(server.address, body, 16, 5.0, None, server.pid))
            saturation = sat.good / 5.0
            load = asyncio.run(_load(server.address, body, args.in_flight, args.seconds, args.deadline_s, server.pid))
    statuses, details, good, rss = load.statuses, load.details, load.good, load.rss_mb
    goodput = good / args.seconds
    third = max(1, len(rss) // 3)
    flat = max(rss[-third:]) <= 1.1 * max(rss[:third]) if rss else False
    unexpected = sorted(set(statuses) - DOCUMENTED)
    print(f"saturation (16 in flight, no deadline): {saturation:.0f} req/s  ({dict(sat.statuses)})")
    print(f"overload ({args.in_flight} in flight, {args.deadline_s:g} s deadlines, {args.seconds:g} s):")
    print(f"  statuses: {dict(statuses)}{'  UNDOCUMENTED: ' + str(unexpected) if unexpected else ''}"
          f"{f'  ({load.cancelled_past_deadline} of the DEADLINE_EXCEEDED arrived as CANCELLED)' if load.cancelled_past_deadline else ''}")
    for code, detail in sorted(details.items()):
        print(f"    {code}: {detail}")
    print(f"  goodput {goodput:.0f} req/s = {goodput / saturation:.2f} x saturation (target >= 0.8)")
    print(f"  server RSS MB each second: {[round(r) for r in rss]}  ({'flat' if flat else 'GROWING'})")
    out = args.out or Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_overload-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"saturation_rps": saturation, "statuses": dict(statuses), "details": details,
                                "cancelled_past_deadline": load.cancelled_past_deadline, "goodput_rps": goodput,
                                "goodput_ratio": goodput / saturation, "rss_mb": rss, "flat": flat,
                                "args": vars(args) | {"out": str(args.out)}}, indent=1) + "\n")
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
