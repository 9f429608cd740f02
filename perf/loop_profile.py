"""Where a server's event-loop thread spends each request, end to end: medserve, the minimal
handler (`minimal_server`) and the fixed response (`fixed_server`) under the same h2load load,
each server's main thread (the thread that runs the asyncio loop, every handler and gRPC's
Cython glue) sampled with Linux `perf record` in the measured window, and the samples split by
shared object: the interpreter (every Python line of the handler, asyncio and grpc.aio), gRPC's
Cython core, the kernel (system calls, wake-ups), onnxruntime, numpy, protobuf, libc.

    python -m medserve.perf.loop_profile --repository demo-repository --model breast_cancer_rf
    python -m medserve.perf.loop_profile --repository demo-repository --concurrency 1,64 --measure-s 4

What `request_path` times in process (the handler without a transport), this reads end to end:
a difference between medserve and the minimal handler that sits in one shared object says
which side of the code owns it (the interpreter: Python that medserve runs and the minimal
handler does not; cygrpc or the kernel: the transport, the same code in both).

The model is copied as version 1 alone (no labels, so no canary or silent trial); medserve runs
with its defaults (batching on, audit off, metrics on) and one worker. Needs `perf` (linux-perf,
with permission to sample the server: root or kernel.perf_event_paranoid <= 2) and `h2load`
(nghttp2-client). Prints a table of microseconds per request by shared object and writes
perf/results/loop_profile-<time>.json. Samples at `--frequency` Hz: at 999 Hz and 4 s a server
gives ~4,000 samples, so a row under ~2 µs per request is within the sampling noise.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import h2load, serverproc
from .bench_rows import prepare_repository
from .measure import executor_round_trip_us
from .report import figure, finish_run, served_model_parser

SERVERS = ("medserve", "minimal", "fixed")
# Shared objects by the part of the request path they are (perf names them by file).
PARTS = (
    ("interpreter", re.compile(r"libpython|^python3")),
    ("grpc (cygrpc)", re.compile(r"cygrpc")),
    ("kernel", re.compile(r"kernel")),
    ("onnxruntime", re.compile(r"onnxruntime")),
    ("numpy", re.compile(r"_multiarray|numpy|libopenblas|libscipy_openblas")),
    ("protobuf", re.compile(r"_message|upb|protobuf")),
    ("asyncio (C)", re.compile(r"_asyncio")),
    ("libc / libstdc++", re.compile(r"libc\.so|libstdc\+\+|libm\.so|ld-linux")),
)
_REPORT_LINE = re.compile(r"^\s*([\d.]+)%\s+(\d+)\s+(.+?)\s*$")


def part_of(dso: str) -> str:
    return next((name for name, pattern in PARTS if pattern.search(dso)), "other")


def parse_report(text: str) -> dict[str, int]:
    """Samples per shared object from `perf report --sort dso -n --stdio` (lines `pct samples dso`)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if m := _REPORT_LINE.match(line):
            out[m.group(3)] = out.get(m.group(3), 0) + int(m.group(2))
    return out


def per_request_us(samples: Mapping[str, int], frequency: int, requests: float) -> dict[str, float]:
    """Samples per shared object as µs of the thread per request, folded into `PARTS`."""
    out: dict[str, float] = {}
    for dso, n in samples.items():
        part = part_of(dso)
        out[part] = out.get(part, 0.0) + n / frequency / requests * 1e6
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _thread_cpu_s(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks (USER_HZ)


def _process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def loaded_window(address: str, pid: int, frame: Path, concurrency: int, warmup_s: float, measure_s: float,
                  work: Path, label: str, during: Callable[[float], object] = time.sleep) -> dict[str, Any]:
    """One server at one level under h2load (warm-up + measure): `during(seconds)` spans the
    measured window (a sleep, or a profiler run that long); the throughput and the CPU per request
    of the event-loop thread (tid = pid) and of the process over the window. `requests_in_window`
    is for the caller to take out."""
    log = work / f"h2load-{label}-{concurrency}.log"
    load = h2load.H2LoadProcess.start(h2load.command(address, frame, concurrency, 8, warmup_s, measure_s, log), log)
    time.sleep(warmup_s + 0.2)
    thread0, proc0, t0 = _thread_cpu_s(pid, pid), _process_cpu_s(pid), time.monotonic()
    during(max(0.5, measure_s - 0.5))
    thread1, proc1, t1 = _thread_cpu_s(pid, pid), _process_cpu_s(pid), time.monotonic()
    summary = load.finish(timeout_s=warmup_s + measure_s + 60)
    failed = summary["requests"]["failed"] + summary["requests"]["errored"]
    if failed:
        raise RuntimeError(f"{label} c={concurrency}: {failed} requests failed")
    window = t1 - t0
    requests = summary["rps"] * window
    return {
        "server": label, "concurrency": concurrency, "throughput_rps": round(summary["rps"], 1),
        "loop_thread_us_per_request": round((thread1 - thread0) / requests * 1e6, 1),
        "process_us_per_request": round((proc1 - proc0) / requests * 1e6, 1),
        "loop_thread_busy": round((thread1 - thread0) / window, 3),
        "requests_in_window": requests,
    }


def profile_point(address: str, pid: int, frame: Path, concurrency: int, warmup_s: float, measure_s: float,
                  frequency: int, work: Path, label: str) -> dict[str, Any]:
    """`loaded_window` with `perf record` of the event-loop thread over the window, split by
    shared object."""
    data = work / f"perf-{label}-{concurrency}.data"

    def record(seconds: float) -> None:
        subprocess.run(["perf", "record", "-q", "-F", str(frequency), "-t", str(pid), "-o", str(data), "--",
                        "sleep", str(seconds)], check=True, capture_output=True, timeout=measure_s + 30)

    point = loaded_window(address, pid, frame, concurrency, warmup_s, measure_s, work, label, during=record)
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "-g", "none", "-n",
                             "--stdio"], check=True, capture_output=True, text=True, timeout=120).stdout
    samples = parse_report(report)
    requests = point.pop("requests_in_window")
    return {**point, "samples": sum(samples.values()),
            "by_part_us": per_request_us(samples, frequency, requests),
            "by_object_samples": dict(sorted(samples.items(), key=lambda kv: -kv[1])[:12])}


@contextlib.contextmanager
def _servers(repo: Path, model: str, work: Path) -> Iterator[tuple[dict[str, serverproc.ServerHandle], bytes]]:
    from .scenario import ModelLoad, build_payloads, fetch_model_info

    with contextlib.ExitStack() as stack:
        medserve = stack.enter_context(serverproc.medserve(repo, log_dir=work))
        body = build_payloads(fetch_model_info(medserve.address, model, repository=str(repo)),
                              ModelLoad(model), 1)[0]  # values from the model card's ranges where it has one
        fixed = stack.enter_context(serverproc.fixed_server(medserve.address, model, log_dir=work, request=body))
        minimal = stack.enter_context(serverproc.minimal_server(repo / model / "1" / "model.onnx", log_dir=work,
                                                                name=model, version="1"))
        yield {"medserve": medserve, "minimal": minimal, "fixed": fixed}, body


def print_report(body: Mapping[str, Any]) -> None:
    print(f"thread hand-off {body['host']['hand_off_us']['median_us']} µs median; model {body['model']}; "
          f"µs of the event-loop thread per request, by shared object (perf record at {body['frequency']} Hz)")
    for level in body["levels"]:
        points = {p["server"]: p for p in body["points"] if p["concurrency"] == level}
        names = [s for s in SERVERS if s in points]
        parts = list(dict.fromkeys(k for s in names for k in points[s]["by_part_us"]))
        print(f"\nc={level}")
        print(f"{'':<22}" + "".join(f"{s:>11}" for s in names) + f"{'medserve - minimal':>20}")
        print(f"{'req/s':<22}" + "".join(f"{figure(points[s]['throughput_rps']):>11}" for s in names))
        rows = [(p, lambda pt, p=p: pt["by_part_us"].get(p, 0.0)) for p in parts] + [
            ("loop thread (all)", lambda pt: pt["loop_thread_us_per_request"]),
            ("process (all threads)", lambda pt: pt["process_us_per_request"])]
        for name, value in rows:
            diff = (f"{value(points['medserve']) - value(points['minimal']):>+20.1f}"
                    if "medserve" in points and "minimal" in points else "")
            print(f"{name:<22}" + "".join(f"{value(points[s]):>11.1f}" for s in names) + diff)
        print(f"{'loop thread busy':<22}" + "".join(f"{points[s]['loop_thread_busy']:>11.2f}" for s in names))
    print("\ninterpreter: every Python line on the loop thread (the handler, asyncio, grpc.aio's Python); "
          "grpc (cygrpc): gRPC's compiled core and its Cython glue; loop thread (all): its CPU time per request "
          "from /proc (the samples' sum, unsampled).")


@dataclass(frozen=True)
class ServedRun:
    """A served-model benchmark's start: its levels, when it started, the thread hand-off, and a
    scratch folder (`work`) holding the model alone as version 1 (`repo`)."""

    levels: list[int]
    started: float
    hand_off: Any
    work: Path
    repo: Path


@contextlib.contextmanager
def served_run(args: argparse.Namespace, prefix: str) -> Iterator[ServedRun]:
    """What `served_model_parser`'s benchmarks start with (the scratch folder is removed after)."""
    levels = [int(v) for v in args.concurrency.split(",") if v.strip()]
    started = time.time()
    hand_off = executor_round_trip_us()
    with tempfile.TemporaryDirectory(prefix=f"medserve-{prefix}-") as tmp:
        work = Path(tmp)
        prepare_repository(work / "repo", args.repository, (args.model,))
        yield ServedRun(levels, started, hand_off, work, work / "repo")


def main(argv: list[str] | None = None) -> int:
    parser = served_model_parser("loop_profile", __doc__)
    parser.add_argument("--frequency", type=int, default=999, help="perf samples per second")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("perf", "h2load") if shutil.which(tool) is None]
    if missing:
        print(f"loop_profile needs {' and '.join(missing)} (linux-perf, nghttp2-client)", file=sys.stderr)
        return 2
    with served_run(args, "loop-profile") as run:
        with _servers(run.repo, args.model, run.work) as (servers, request):
            frame = h2load.write_frame(request, run.work / "request.bin")
            points = []
            for level in run.levels:
                for name in SERVERS:
                    print(f"  {name} c={level} ...", file=sys.stderr)
                    server = servers[name]
                    points.append(profile_point(server.address, server.pid, frame, level, args.warmup_s,
                                                args.measure_s, args.frequency, run.work, name))
    finish_run("loop_profile", {"model": args.model, "frequency": args.frequency, "levels": run.levels,
                                "points": points}, args, run.started, print_report, hand_off_us=run.hand_off)
    return 0


if __name__ == "__main__":
    sys.exit(main())
