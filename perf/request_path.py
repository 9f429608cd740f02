"""Where a request's microseconds go on medserve's event loop, without the gRPC transport: each
stage of one batch-1 request timed alone (the best of several timed loops, so a busy host reads
the same as a quiet one), then the whole path from the gate's handler to the serialized answer,
one request at a time and 64 at a time, against the least a handler does (parse, run, encode).

    python -m medserve.perf.request_path --repository demo-repository --model breast_cancer_rf

The server's own objects are built and loaded as `medserve serve` builds them (`MedserveServer`),
and its ModelInfer handler (the gate, the servicer, the core, the batcher) is called with the
request's bytes and a stand-in for gRPC's servicer context: peer, metadata and deadline, no
transport. What this does not show, the transport's share (HTTP/2, gRPC's completion queue and
the asyncio server around it), is the difference between `bench_batching`'s end-to-end figures
and these.
"""
from __future__ import annotations

import asyncio
import gc
import json
import time
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from medserve.protos import grpc_service_pb2 as pb

from .measure import executor_round_trip_us
from .report import bench_parser, write_result


class StandInContext:
    """What the ModelInfer path reads from gRPC's servicer context, with no call behind it."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None

    def auth_context(self) -> dict[str, Any]:
        return {}

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def best_us(fn: Callable[[], object], number: int = 2000, repeat: int = 9) -> float:
    """µs per call: the fastest of `repeat` timed loops (preemptions only ever add)."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


async def best_async_us(make: Callable[[], Awaitable[object]], number: int = 2000, repeat: int = 9) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            await make()
        runs.append(time.perf_counter() - start)
    return min(runs) / number * 1e6


async def loop_cpu_us(handle: Callable[[], Awaitable[object]], requests: int, concurrency: int,
                      repeat: int = 5) -> float:
    """The event-loop thread's CPU µs per request with `concurrency` callers in flight (best of
    `repeat`): with 64 in flight the batcher forms batches, as under load."""
    best = float("inf")
    for _ in range(repeat):
        left = requests

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await handle()

        start = time.thread_time()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        best = min(best, (time.thread_time() - start) / requests * 1e6)
    return best


def one_row(repository: Path, model: str, card: dict[str, Any], width: int) -> np.ndarray:
    """A row inside the training ranges (the card's midpoints) when the card has them, else zeros."""
    ranges = card.get("feature_ranges") or {}
    names = card.get("feature_names") or []
    if ranges and len(names) == width:
        return np.array([[sum(ranges[n]) / 2 for n in names]], np.float32)
    return np.zeros((1, width), np.float32)


async def measure(repository: Path, model: str) -> dict[str, Any]:
    from medserve.server.app import MedserveServer
    from medserve.server.codec import decode_fixed, decode_infer_request, encode_infer_response
    from medserve.server.config import ServerConfig
    from medserve.server.gate import SERVICE

    server = MedserveServer(ServerConfig(repository=str(repository), port=0, load_models=(model,),
                                         model_control_mode="explicit"))
    await server.repository.load_named((model,), exit_on_error=True)
    server.lifecycle.started = True
    gc.freeze()  # as `start` does: the loaded sessions are not rescanned by every collection
    loaded = server.repository.get(model)
    (spec,) = [t for t in loaded.config.inputs]
    width = spec.dims[-1]
    card_path = repository / model / str(loaded.version) / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    x = one_row(repository, model, card, width)
    request = pb.ModelInferRequest(model_name=model, id="r1")
    tensor = request.inputs.add(name=spec.name, datatype="FP32")
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(x.tobytes())
    body = request.SerializeToString()
    handlers = server.gate.handler(server._servicer)._method_handlers  # noqa: SLF001 - a profiling aid
    handler = handlers[f"/{SERVICE.full_name}/ModelInfer"].unary_unary
    context = StandInContext()
    decoded = decode_infer_request(request)
    inputs, _ = loaded.signature.validate(loaded.label, decoded.inputs)
    result = await server.core.infer(decoded)
    session_run = loaded.model

    async def handle() -> object:
        answer = await handler(body, context)
        if answer is None:
            raise RuntimeError(f"refused: {getattr(context, 'details', '?')}")
        return answer.SerializeToString()

    async def minimal() -> bytes:
        """Parse, run inline, encode: the least a handler does."""
        req = pb.ModelInferRequest.FromString(body)
        feed = np.frombuffer(req.raw_input_contents[0], np.float32).reshape(tuple(req.inputs[0].shape))
        outputs = session_run({req.inputs[0].name: feed})
        response = pb.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
        response.parameters["model_sha256"].string_param = loaded.sha256
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response.SerializeToString()

    fixed = loaded.signature.fixed_input
    stages = {
        "parse": best_us(lambda: pb.ModelInferRequest.FromString(body)),
        "decode": best_us(lambda: decode_infer_request(request)),
        "decode + validate, fixed signature": best_us(lambda: decode_fixed(request, fixed)) if fixed else 0.0,
        "validate": best_us(lambda: loaded.signature.validate(loaded.label, decoded.inputs)),
        "monitor": best_us(lambda: loaded.monitor.check(inputs)) if loaded.monitor is not None else 0.0,
        "engine (OnnxModel)": best_us(lambda: session_run(inputs)),
        "encode + serialize": best_us(lambda: encode_infer_response(result).SerializeToString()),
        "core.infer (validate .. result)": await best_async_us(lambda: server.core.infer(decoded)),
        "handler (gate .. serialized answer)": await best_async_us(handle),
        "minimal (parse, run, encode)": await best_async_us(minimal),
    }
    stages["batcher (submit .. result), by difference"] = (
        stages["core.infer (validate .. result)"] - stages["validate"] - stages["monitor"])
    loop = {f"{name} c={c}": await loop_cpu_us(fn, 4000, c)
            for c in (1, 64) for name, fn in (("handler", handle), ("minimal", minimal))}
    stats = loaded.batcher.stats()
    await server.stop(0)
    return {"model": model, "stages_us": stages, "loop_cpu_us_per_request": loop,
            "batches": stats.executed_batches, "inline_batches": stats.inline_batches}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("request_path", __doc__)
    parser.add_argument("--repository", type=Path, default=Path("demo-repository"))
    parser.add_argument("--model", default="breast_cancer_rf")
    args = parser.parse_args(argv)
    started = time.time()
    handoff = executor_round_trip_us(5000)
    body = asyncio.run(measure(args.repository, args.model))
    print(f"hand-off (run_in_executor round trip): {handoff['median_us']:.0f} µs median")
    print(f"{args.model}: one batch-1 request, best of 9 timed loops (µs)")
    for name, us in body["stages_us"].items():
        print(f"  {name:44s} {us:8.1f}")
    print("event-loop CPU per request, µs (best of 5 runs of 4,000 requests)")
    for name, us in body["loop_cpu_us_per_request"].items():
        print(f"  {name:44s} {us:8.1f}")
    print(f"batches {body['batches']}, of which inline {body['inline_batches']}")
    path = write_result("request_path", body, started_unix=started, out_dir=args.out, handoff_us=handoff)
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
