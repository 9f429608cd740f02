"""The second ceiling: the least a real handler does. A grpc.aio server for ONE model file that
parses each ModelInferRequest with the generated protobuf classes, decodes raw_input_contents
with numpy.frombuffer, runs the onnxruntime session inline on the event loop and serializes a
ModelInferResponse built from the real outputs: the same output names, datatypes and raw bytes
layout, and the same response parameter (`model_sha256`) that medserve sends, so the sizes match.

No gate, no interceptors, no batcher, no validation beyond what parsing needs, no statistics:
whatever medserve spends beyond this server is its own request path (`bench_batching` prints
medserve / minimal beside medserve / fixed).

    python -m medserve.perf.minimal_server --model-file repo/rf_on/1/model.onnx --port 0 \
        --ready-file /tmp/minimal.json [--workers 2]

The session is built as medserve builds it (`medserve.server.runtime.OnnxModel` with the same
`SessionOptions` as `medserve serve`'s defaults: best usable providers, one intra-op thread);
nothing else of `medserve.server` is on its request path.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import numpy_dtype

from . import reuseport

SERVICE = "inference.GRPCInferenceService"


class Handler:
    """ModelInfer for one model: parse, decode, run inline, encode. Also the few calls the
    harness makes before any load (ModelMetadata, ServerLive/Ready, ModelReady)."""

    def __init__(self, model_file: Path, name: str, version: str, intra_op_threads: int = 1,
                 inter_op_threads: int = 0) -> None:
        from medserve.server.runtime import OnnxModel, SessionOptions

        source = model_file.read_bytes()
        self.model = OnnxModel(source, SessionOptions(intra_op_threads=intra_op_threads,
                                                      inter_op_threads=inter_op_threads), shown=model_file.name)
        self.name, self.version = name, version
        self.sha256 = hashlib.sha256(source).hexdigest()
        self.datatypes = {t.name: t.datatype for t in self.model.outputs}
        self.input_types = {t.name: numpy_dtype(t.datatype) for t in self.model.inputs}

    async def infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        raw = request.raw_input_contents
        if len(raw) != len(request.inputs):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"model {self.name!r}: send every input in raw_input_contents")
        feeds = {}
        for tensor, data in zip(request.inputs, raw, strict=True):
            dtype = self.input_types.get(tensor.name)
            if dtype is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"model {self.name!r}: no input {tensor.name!r}")
            try:
                feeds[tensor.name] = np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.shape))
            except ValueError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"model {self.name!r}: input {tensor.name!r}: raw contents do not fit its shape")
        try:
            outputs = self.model(feeds)
        except Exception:  # noqa: BLE001 - the engine's text may quote values: never sent on
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model {self.name!r}: the model refused the inputs")
        wanted = [o.name for o in request.outputs] or list(outputs)
        unknown = [name for name in wanted if name not in outputs]
        if unknown:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model {self.name!r}: no output {unknown[0]!r}")
        response = pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=request.id)
        response.parameters["model_sha256"].string_param = self.sha256
        for name in wanted:
            array = outputs[name]
            response.outputs.add(name=name, datatype=self.datatypes[name], shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response

    async def metadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        response = pb.ModelMetadataResponse(name=self.name, versions=[self.version], platform="onnxruntime_onnx")
        for t in self.model.inputs:
            response.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in self.model.outputs:
            response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return response

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        def unary(fn: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=request.FromString,
                                                       response_serializer=response.SerializeToString)

        async def live(_r: Any, _c: Any) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        async def ready(_r: Any, _c: Any) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=True)

        async def model_ready(_r: Any, _c: Any) -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=True)

        return {
            "ModelInfer": unary(self.infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelMetadata": unary(self.metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ServerLive": unary(live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
        }


async def serve(handler: Handler, *, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False,
                ready_file: Path | None = None, stop: asyncio.Event | None = None,
                max_message_bytes: int = 16 << 20) -> None:
    """Serve `handler` until `stop` is set or SIGTERM."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0),
                                      ("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handler.handlers()),))
    await reuseport.serve_until_stopped(server, f"{host}:{port}", ready_file, stop)


def _worker(host: str, port: int, reuse_port: bool, ready_file: Path | None, model_file: Path, name: str,
            version: str, intra_op_threads: int, inter_op_threads: int) -> None:
    handler = Handler(model_file, name, version, intra_op_threads, inter_op_threads)
    asyncio.run(serve(handler, host=host, port=port, reuse_port=reuse_port, ready_file=ready_file))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medserve.perf.minimal_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-file", type=Path, required=True, help="the model.onnx to serve")
    parser.add_argument("--name", default=None, help="model name in responses (default: the repository folder, "
                                                     "<name>/<version>/model.onnx)")
    parser.add_argument("--version", default=None, help="version in responses (default: the version folder)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--intra-op-threads", type=int, default=1, help="as medserve serve's default")
    parser.add_argument("--inter-op-threads", type=int, default=0, help="as medserve serve's default")
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)
    path = args.model_file.resolve()
    name = args.name or path.parent.parent.name
    version = args.version or path.parent.name
    return reuseport.run_workers(_worker, (path, name, version, args.intra_op_threads, args.inter_op_threads),
                                 args.workers, args.host, args.port, args.ready_file, "medserve-minimal")


if __name__ == "__main__":
    sys.exit(main())
