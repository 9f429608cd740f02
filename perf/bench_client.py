"""What the medserve client costs per call, next to the raw generated stub, on the same server in
the same run, one call at a time.

Both paths do the same work a caller needs: numpy in, numpy out, a deadline on every call.
  raw    - build a ModelInferRequest with `wire.to_raw`, call `GRPCInferenceServiceStub.ModelInfer`
           with a timeout, decode every output with `wire.from_raw`;
  client - `Client.infer(model, {"x": x})` (validation, retry loop, typed errors, InferResult).
Blocks of N sequential calls alternate raw, client, raw, client... so drift in the machine or the
server hits both alike; the first block of each is a warm-up and is not counted.

    python perf/bench_client.py                       # starts `medserve serve` on a tiny model
    python -m medserve.perf.bench_client --target 127.0.0.1:8001 --model affine --features 4
    python perf/bench_client.py --calls 500 --blocks 20 --json /tmp/bench_client.json

Reported: mean / p50 / p99 latency in microseconds per path and the client/raw ratios
(target: mean ratio <= 1.10).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from medserve.clients import Client
from medserve.perf.measure import time_calls
from medserve.perf.report import write_result
from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import datatype_of, from_raw, to_raw

TIMEOUT_S = 10.0


def _tiny_model(path: Path, features: int) -> None:
    """y = 2 x + 1 over FP32 [N, features] (needs the `onnx` package; only for the self-started server)."""
    from onnx import TensorProto, helper, numpy_helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])
    nodes = [helper.make_node("Mul", ["x", "two"], ["x2"]), helper.make_node("Add", ["x2", "one"], ["y"])]
    init = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "affine", [x], [y], init), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, str(path))


@contextlib.contextmanager
def tiny_server(features: int) -> Iterator[str]:
    """`medserve serve` in a child process on a free port, serving one tiny model."""
    from medserve.perf.serverproc import medserve

    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        repo = Path(tmp) / "repo"
        _tiny_model(repo / "affine" / "1" / "model.onnx", features)
        with medserve(repo, log_dir=Path(tmp)) as handle:
            yield handle.address


def _raw_call(stub: pb_grpc.GRPCInferenceServiceStub, model: str, x: np.ndarray) -> Callable[[], object]:
    datatype = datatype_of(x.dtype)

    def call() -> object:
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="x", datatype=datatype, shape=x.shape)
        request.raw_input_contents.append(to_raw(x))
        response = stub.ModelInfer(request, timeout=TIMEOUT_S)
        return {
            t.name: from_raw(raw, t.datatype, t.shape)
            for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }

    return call


def _summary(ns: list[int]) -> dict[str, float]:
    us = np.asarray(ns, dtype=np.float64) / 1000.0
    return {
        "calls": int(us.size),
        "mean_us": float(us.mean()),
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
    }


def bench(target: str, model: str, features: int, calls: int, blocks: int) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal((1, features)).astype(np.float32)
    channel = grpc.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
    )
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    raw = _raw_call(stub, model, x)
    with Client(target, timeout_s=TIMEOUT_S) as client:

        def via_client() -> object:
            return client.infer(model, {"x": x})

        results: dict[str, list[int]] = {"raw": [], "client": []}
        for block in range(blocks + 1):  # block 0: warm-up of both paths
            for name, call in (("raw", raw), ("client", via_client)) if block % 2 else (
                ("client", via_client), ("raw", raw)
            ):
                times = time_calls(call, calls=calls)
                if block:
                    results[name].extend(times)
    channel.close()
    raw_s, client_s = _summary(results["raw"]), _summary(results["client"])
    return {
        "target": target,
        "model": model,
        "input": f"FP32[1, {features}]",
        "calls_per_block": calls,
        "blocks": blocks,
        "raw": raw_s,
        "client": client_s,
        "ratio_mean": client_s["mean_us"] / raw_s["mean_us"],
        "ratio_p50": client_s["p50_us"] / raw_s["p50_us"],
        "overhead_mean_us": client_s["mean_us"] - raw_s["mean_us"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="a running server (default: start `medserve serve` on a tiny model)")
    parser.add_argument("--model", default="affine", help="model with one FP32 input 'x' of [N, features]")
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--calls", type=int, default=250, help="sequential calls per block")
    parser.add_argument("--blocks", type=int, default=16, help="measured blocks per path (plus one warm-up)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    started = time.time()
    with contextlib.ExitStack() as stack:
        target = args.target or stack.enter_context(tiny_server(args.features))
        report = bench(target, args.model, args.features, args.calls, args.blocks)
    for name in ("raw", "client"):
        s = report[name]
        print(f"{name:>6}: {s['calls']} calls  mean {s['mean_us']:8.1f} us  p50 {s['p50_us']:8.1f} us  "
              f"p99 {s['p99_us']:8.1f} us")
    print(f" ratio: mean {report['ratio_mean']:.3f}  p50 {report['ratio_p50']:.3f}  "
          f"(client overhead {report['overhead_mean_us']:+.1f} us per call; target ratio <= 1.10)")
    if args.json:
        write_result("bench_client", report, started_unix=started, path=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
