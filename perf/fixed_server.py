"""The Python transport ceiling: a minimal grpc.aio server that answers each method of
`inference.GRPCInferenceService` it knows with one fixed, pre-serialized response.

No deserialization, no model, no batching: generic handlers with `request_deserializer=None`
and `response_serializer=None`, so the bytes it returns are exactly the bytes it was given. What
this server reaches on a machine is the most any grpc.aio server in Python can reach there for
the same message sizes; medserve's figures are read against it (`bench_batching`).

    python -m medserve.perf.fixed_server --capture-from 127.0.0.1:8001 --model rf --port 0 \
        --ready-file /tmp/fixed.json [--workers 2]

`--capture-from` takes the real ModelMetadata and one real ModelInfer response from a running
server, so the sizes match: to a request of `--batch` rows built from the model's metadata, or to
the serialized ModelInferRequest in `--request-file` (a model with variable dims, e.g. text).
Methods it has no response for answer UNIMPLEMENTED.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from . import reuseport

SERVICE = "inference.GRPCInferenceService"


def _handler(body: bytes) -> grpc.RpcMethodHandler:
    async def answer(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return body

    return grpc.unary_unary_rpc_method_handler(answer, request_deserializer=None, response_serializer=None)


async def serve(
    responses: Mapping[str, bytes],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    reuse_port: bool = False,
    ready_file: Path | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve `responses` (method name -> serialized response) until `stop` is set or SIGTERM."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    handlers = {method: _handler(body) for method, body in responses.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    await reuseport.serve_until_stopped(server, f"{host}:{port}", ready_file, stop)


def capture(target: str, model: str, request: bytes, version: str = "") -> dict[str, bytes]:
    """The real ModelMetadata and ModelInfer response bytes of `model` on a running server."""
    from medserve.protos import grpc_service_pb2 as pb

    with grpc.insecure_channel(target) as channel:
        def call(method: str, body: bytes) -> bytes:
            rpc: Any = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
            return rpc(body, timeout=30)

        meta = call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version).SerializeToString())
        infer = call("ModelInfer", request)
        live = call("ServerLive", b"")
        ready = call("ServerReady", b"")
    return {"ModelMetadata": meta, "ModelInfer": infer, "ServerLive": live, "ServerReady": ready,
            "ModelReady": pb.ModelReadyResponse(ready=True).SerializeToString()}


def _worker(host: str, port: int, reuse_port: bool, ready_file: Path | None, responses: dict[str, bytes]) -> None:
    asyncio.run(serve(responses, host=host, port=port, reuse_port=reuse_port, ready_file=ready_file))


def run_workers(responses: dict[str, bytes], workers: int, host: str, port: int, ready_file: Path | None) -> int:
    """`workers` processes on one port (SO_REUSEPORT), kept up by the supervisor of
    `medserve serve --workers N` (`medserve.server.workers.supervise`)."""
    return reuseport.run_workers(_worker, (responses,), workers, host, port, ready_file, "medserve-fixed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medserve.perf.fixed_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture-from", required=True, help="host:port of a running server to copy responses from")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default="")
    parser.add_argument("--batch", type=int, default=1, help="rows of the captured request")
    parser.add_argument("--request-file", type=Path, default=None,
                        help="a serialized ModelInferRequest to capture the response to (instead of --batch)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)
    from .scenario import ModelLoad, build_payloads, fetch_model_info

    if args.request_file is not None:
        request = args.request_file.read_bytes()
    else:
        info = fetch_model_info(args.capture_from, args.model, args.version)
        request = build_payloads(info, ModelLoad(model=args.model, version=args.version, batch=args.batch), count=1)[0]
    responses = capture(args.capture_from, args.model, request, args.version)
    return run_workers(responses, args.workers, args.host, args.port, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
