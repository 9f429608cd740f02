"""REST against gRPC on one model in one run: the same rows sent as a gRPC ModelInferRequest
(h2load over HTTP/2, the `perf.h2load` frame), as REST with Triton's binary tensor extension, and
as REST with JSON tensors (h2load over HTTP/1.1, one request in flight per connection), closed
loop at the same concurrency, to one `medserve serve` process. Every answer is checked: REST
failures are HTTP 4xx/5xx, gRPC's status is read from the server's statistics (`perf.h2load`).
MLServer, the issue's third column, is not installed here and is not measured.

    python -m medserve.perf.bench_rest --repository demo-repository --model breast_cancer_rf \\
        --concurrency 64 --rows 1,64,1024 --seconds 10                # about a minute on 2 cores

Figures go to perf/README.md ("REST against gRPC").
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import to_raw

from . import h2load
from .measure import executor_round_trip_us
from .report import bench_parser, write_result
from .serverproc import medserve


def grpc_body(model: str, version: str, x: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(to_raw(x))
    return request.SerializeToString()


def rest_json(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()


def rest_binary(x: np.ndarray) -> tuple[bytes, int]:
    raw = to_raw(x)
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, len(header)


def _run(cmd: list[str], seconds: float) -> dict[str, Any]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if done.returncode != 0:
        raise h2load.H2LoadError(done.stdout[-2000:] + done.stderr[-2000:])
    return h2load.parse_output(done.stdout)


def rest_load(port: int, path: str, body: Path, headers: list[str], concurrency: int, warmup_s: float,
              seconds: float) -> dict[str, Any]:
    cmd = ["h2load", "--h1", "-c", str(concurrency), "-m", "1", "-t", "1", "-D", f"{round(seconds * 1000)}ms",
           "--warm-up-time", f"{round(warmup_s * 1000)}ms", "-d", str(body)]
    for h in headers:
        cmd += ["-H", h]
    out = _run([*cmd, f"http://127.0.0.1:{port}{path}"], seconds)
    codes = out.get("http_codes", {})
    out["ok"] = codes.get("4xx", 1) == 0 and codes.get("5xx", 1) == 0 and out["requests"]["failed"] == 0
    return out


def grpc_load(address: str, frame: Path, concurrency: int, connections: int, warmup_s: float,
              seconds: float) -> dict[str, Any]:
    status, detail = h2load.check_grpc_status(address, frame)
    out = _run(h2load.command(address, frame, concurrency, connections, warmup_s, seconds), seconds)
    out["ok"] = status == 0 and out["requests"]["failed"] == 0
    out["grpc_preflight"] = detail if status != 0 else "OK"
    return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("bench_rest", __doc__)
    p.add_argument("--repository", default="demo-repository")
    p.add_argument("--model", default="breast_cancer_rf")
    p.add_argument("--version", default="1")
    p.add_argument("--features", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--grpc-connections", type=int, default=8, help="HTTP/2 connections for gRPC (streams share them)")
    p.add_argument("--rows", default="1", help="rows per request, comma-separated (a sweep)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args(argv)
    started = time.time()
    if h2load.find() is None:
        print("needs h2load (nghttp2-client)", file=sys.stderr)
        return 2
    hand_off = executor_round_trip_us()
    print(f"thread hand-off (one loop.run_in_executor round trip): {hand_off['median_us']} µs median", file=sys.stderr)
    results: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, medserve(
            args.repository, args=("--model-control-mode", "explicit", "--load-model", args.model),
            log_dir=Path(tmp)) as server:
        assert server.http_port is not None
        path = f"/v2/models/{args.model}/versions/{args.version}/infer"
        for rows in (int(r) for r in args.rows.split(",")):
            x = rng.normal(size=(rows, args.features)).astype(np.float32)
            frame = h2load.write_frame(grpc_body(args.model, args.version, x), Path(tmp) / f"grpc-{rows}.bin")
            binary, header = rest_binary(x)
            (Path(tmp) / f"bin-{rows}.bin").write_bytes(binary)
            (Path(tmp) / f"json-{rows}.json").write_bytes(rest_json(x))
            runs = {
                "grpc": lambda: grpc_load(server.address, frame, args.concurrency, args.grpc_connections,  # noqa: B023
                                          args.warmup, args.seconds),
                "rest_binary": lambda: rest_load(server.http_port, path, Path(tmp) / f"bin-{rows}.bin",  # noqa: B023
                                                 ["content-type: application/octet-stream",
                                                  f"inference-header-content-length: {header}"],  # noqa: B023
                                                 args.concurrency, args.warmup, args.seconds),
                "rest_json": lambda: rest_load(server.http_port, path, Path(tmp) / f"json-{rows}.json",  # noqa: B023
                                               ["content-type: application/json"], args.concurrency, args.warmup,
                                               args.seconds),
            }
            row: dict[str, Any] = {"rows": rows, "concurrency": args.concurrency}
            for name, run in runs.items():
                out = run()
                row[name] = {"req_per_s": out["rps"], "rows_per_s": out["rps"] * rows, "ok": out["ok"],
                             "latency_mean_ms": out.get("latency_us", {}).get("mean", float("nan")) / 1e3}
                time.sleep(0.5)
            row["binary_over_grpc"] = row["rest_binary"]["req_per_s"] / row["grpc"]["req_per_s"]
            row["json_over_grpc"] = row["rest_json"]["req_per_s"] / row["grpc"]["req_per_s"]
            print(json.dumps(row), flush=True)
            results.append(row)
    body = {"model": args.model, "version": args.version, "concurrency": args.concurrency, "seconds": args.seconds,
            "grpc_connections": args.grpc_connections, "mlserver": "not installed: not measured", "results": results}
    print(write_result("bench_rest", body, started_unix=started, out_dir=args.out, hand_off_us=hand_off))
    return 0 if all(r[k]["ok"] for r in results for k in ("grpc", "rest_binary", "rest_json")) else 1



if __name__ == "__main__":
    raise SystemExit(main())
