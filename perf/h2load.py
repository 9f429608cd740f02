"""h2load (nghttp2's C HTTP/2 load generator) as an alternative generator: far less CPU per
request than any Python client, so it shows what the server can do when the generator costs
almost nothing — the yardstick for the Python generator's saturation check.

h2load sends one pre-encoded gRPC frame (1-byte compressed flag, 4-byte big-endian length,
serialized ModelInferRequest) on every request. It counts HTTP 200 as success even when gRPC
failed (the gRPC status is in the trailers: RESOURCE_EXHAUSTED under load still answers HTTP
200), so the truth comes from elsewhere: the server's own ModelStatistics success and fail
counts over the window give the successes (`reconcile`), and `nghttp -v` reads the trailers of
one identical request before the run (`check_grpc_status`) for the code of the failures. Where
h2load's count of successes and the server's differ, the result says so.

Closed loop only: `-c` connections, `-m` streams each (concurrency = c * m). Latencies come
from h2load's per-request `--log-file` (main duration only, warm-up excluded).
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .measure import FAILED
from .scenario import INFER_PATH, grpc_message

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
UNKNOWN = 2  # gRPC UNKNOWN: an HTTP error, or a status nobody checked
# h2load's successes and the server's may differ by requests that completed while the
# statistics were being read (the window's edges); beyond this they disagree.
SLACK_MIN, SLACK_SHARE = 5, 0.01


class H2LoadError(RuntimeError):
    pass


def write_frame(body: bytes, path: Path) -> Path:
    path.write_bytes(grpc_message(body))
    return path


def find(binary: str = "h2load") -> str | None:
    return shutil.which(binary)


def split_concurrency(concurrency: int, connections: int) -> tuple[int, int]:
    """(connections, streams per connection) with connections * streams == concurrency and
    connections as close to the requested number as divisibility allows."""
    c = max(1, min(connections, concurrency))
    while concurrency % c:
        c -= 1
    return c, concurrency // c


def command(address: str, frame: Path, concurrency: int, connections: int, warmup_s: float, measure_s: float,
            log_file: Path | None = None, binary: str = "h2load") -> list[str]:
    conns, streams = split_concurrency(concurrency, connections)
    cmd = [binary, "-D", f"{round(measure_s * 1000)}ms", "-c", str(conns), "-m", str(streams), "-t", "1"]
    if warmup_s > 0:
        cmd += ["--warm-up-time", f"{round(warmup_s * 1000)}ms"]
    for h in GRPC_HEADERS:
        cmd += ["-H", h]
    cmd += ["-d", str(frame)]
    if log_file is not None:
        cmd += [f"--log-file={log_file}"]
    cmd.append(f"http://{address}{INFER_PATH}")
    return cmd


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_CODES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_TIME = re.compile(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)")


def _us(value: str, unit: str) -> float:
    return float(value) * {"us": 1.0, "ms": 1e3, "s": 1e6}[unit]


def parse_output(text: str) -> dict[str, Any]:
    """The summary h2load prints: duration (warm-up included), req/s (main duration only),
    request counts, HTTP codes, latency min/max/mean."""
    out: dict[str, Any] = {}
    if m := _FINISHED.search(text):
        out["duration_s"] = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        out["rps"] = float(m.group(3))
    if m := _REQUESTS.search(text):
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        out["requests"] = dict(zip(keys, map(int, m.groups()), strict=True))
    if m := _CODES.search(text):
        out["http_codes"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups()), strict=True))
    if m := _TIME.search(text):
        out["latency_us"] = {"min": _us(m.group(1), m.group(2)), "max": _us(m.group(3), m.group(4)),
                             "mean": _us(m.group(5), m.group(6))}
    if "requests" not in out:
        raise H2LoadError(f"cannot parse h2load output:\n{text[-2000:]}")
    return out


def read_log(path: Path) -> dict[str, np.ndarray]:
    """h2load's --log-file: start (µs since the epoch), HTTP status, latency (µs) per request."""
    if not path.exists() or path.stat().st_size == 0:
        return {"start_us": np.zeros(0, np.int64), "http": np.zeros(0, np.int64), "latency_us": np.zeros(0, np.int64)}
    data = np.loadtxt(path, dtype=np.int64, ndmin=2)
    return {"start_us": data[:, 0], "http": data[:, 1], "latency_us": data[:, 2]}


def reconcile(http: np.ndarray, end_us: np.ndarray, window_us: tuple[float, float], preflight: int | None,
              counted: tuple[int, int] | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-request gRPC statuses for h2load's log (HTTP status and completion time of each
    request), and h2load's claim set against what the server counted.

    h2load claims every HTTP 200 as a success. `counted` is the server's (successes, failures)
    of the model between two statistics snapshots taken at `window_us` (wall clock, µs);
    h2load's claim is its HTTP-200 answers completed inside that window, `difference` the
    claim minus the server's successes, and `agree` whether that is within the window's edge
    slack. The statuses: HTTP errors are UNKNOWN; of the HTTP-200 answers the server's share of
    failures is failed, with the preflight's code when that was an error and FAILED (code
    unseen) otherwise, the rest OK. Which answers failed nobody knows, so where both kinds are
    present `latency_mixed` is set: OK latencies cannot be told from failed ones. Without
    server statistics (`counted` None, or a model the server never counted) the preflight's
    status stands for every HTTP 200, as `source` says."""
    ok_http = http == 200
    code = UNKNOWN if preflight is None else preflight
    claimed = int((ok_http & (end_us >= window_us[0]) & (end_us <= window_us[1])).sum())
    status = np.where(ok_http, code, UNKNOWN).astype(np.int16)
    check: dict[str, Any] = {"h2load_ok": claimed, "server_success": None, "server_fail": None,
                             "difference": None, "agree": None, "source": "preflight", "latency_mixed": False}
    if counted is None:
        return status, check
    success, fail = counted
    slack = max(SLACK_MIN, math.ceil(SLACK_SHARE * max(claimed, success)))
    check.update(server_success=success, server_fail=fail, difference=claimed - success,
                 agree=abs(claimed - success) <= slack)
    if success + fail == 0:
        return status, check  # nothing reached the model (unknown model, undecodable request)
    answered = np.flatnonzero(ok_http)
    n_fail = round(answered.size * fail / (success + fail))
    status[answered] = 0
    if n_fail:
        # Spread over the run, so offsets of the OK ones are not skewed to one end.
        status[answered[np.arange(n_fail) * answered.size // n_fail]] = code if code not in (0, UNKNOWN) else FAILED
    check.update(source="server", latency_mixed=0 < n_fail < answered.size)
    return status, check


def check_grpc_status(address: str, frame: Path, timeout_s: float = 10) -> tuple[int | None, str]:
    """Send the frame once with `nghttp -v` and read grpc-status / grpc-message from the
    trailers; (None, reason) when nghttp is missing or no status was seen."""
    nghttp = find("nghttp")
    if nghttp is None:
        return None, "nghttp not installed (apt-get install nghttp2-client)"
    cmd = [nghttp, "-v"]
    for h in GRPC_HEADERS:
        cmd += ["-H", h]
    cmd += ["-d", str(frame), f"http://{address}{INFER_PATH}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, "nghttp timed out"
    text = proc.stdout.decode("latin-1")
    status = re.search(r"grpc-status: (\d+)", text)
    message = re.search(r"grpc-message: ([^\r\n]*)", text)
    if status is None:
        return None, "no grpc-status in the trailers"
    return int(status.group(1)), (message.group(1).strip() if message else "")


@dataclass
class H2LoadProcess:
    """A running h2load; `finish()` waits and returns its parsed summary and log."""

    cmd: list[str]
    proc: subprocess.Popen[bytes]
    log_file: Path

    @classmethod
    def start(cls, cmd: list[str], log_file: Path) -> H2LoadProcess:
        return cls(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), log_file)

    def finish(self, timeout_s: float) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise H2LoadError(f"h2load did not finish within {timeout_s:.0f} s") from None
        text = out.decode(errors="replace")
        summary = parse_output(text)
        summary["log"] = read_log(self.log_file)
        return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m medserve.perf.h2load --target HOST:PORT --model NAME -o body.bin`: write the
    gRPC frame of one real request for the model (data from its card or random) and print the
    h2load and nghttp commands that use it."""
    import argparse
    import shlex

    from .scenario import ModelLoad, build_payloads, fetch_model_info

    parser = argparse.ArgumentParser(prog="python -m medserve.perf.h2load", description=main.__doc__)
    parser.add_argument("--target", default="127.0.0.1:8001")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default="")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repository", default=None, help="model repository (for the card's feature ranges)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("-o", "--output", type=Path, default=Path("body.bin"))
    args = parser.parse_args(argv)
    info = fetch_model_info(args.target, args.model, args.version, args.repository)
    body = build_payloads(info, ModelLoad(args.model, args.version, batch=args.batch), 1)[0]
    write_frame(body, args.output)
    h2 = command(args.target, args.output, args.concurrency, 4, 1.0, 10.0)
    print(f"wrote {args.output} ({len(body) + 5} bytes: one gRPC frame of a ModelInferRequest for {args.model!r})")
    print("load:   " + shlex.join(h2))
    nghttp = ["nghttp", "-v"] + [x for h in GRPC_HEADERS for x in ("-H", h)] + [
        "-d", str(args.output), f"http://{args.target}{INFER_PATH}"]
    print("status: " + shlex.join(nghttp) + " | grep -a grpc-")
    status, message = check_grpc_status(args.target, args.output)
    print(f"grpc-status of this frame now: {status} {message}".rstrip())
    return 0 if status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
