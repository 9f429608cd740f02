"""A prototype, measured on CPU: N front-end processes (grpc.aio: parse and decode) feeding ONE
engine process (one onnxruntime session, batching whatever arrived) over pipes, against N
independent workers each with its own session (`minimal_server --workers N`, and medserve
`--workers N`). The question it answers for GPU nodes (perf/README.md, "GPU nodes with many
front ends"): does one shared engine per device give larger batches and more throughput than
N workers each with its own session and queue?

    python -m medserve.perf.shared_engine --frontends 2 --levels 64,256 --measure-s 2   # ~1.5 min
    python -m medserve.perf.shared_engine serve --model-file m.onnx --frontends 2 --ready-file r.json

The engine protocol (one duplex pipe per front end; each message one `send_bytes`):
  front end -> engine: records `<Q id><I rows><raw input bytes>`, as many as arrived in one
  turn of the front end's event loop (writes coalesced per loop turn);
  engine -> front end: `<I count>`, then count x `<Q id><I rows>`, then per output the rows of
  those requests in order (one contiguous slice of the batch's output per front end).
The engine waits on every pipe, takes every record that has arrived, runs them as one batch,
and answers each front end with one message. Counters (requests, rows, batches, engine ns) sit
in shared memory; each front end answers ModelStatistics from them (one model, all front ends).

Prototype limits (see perf/README.md for what a real one needs): one FP32/INT input of fixed
row width, no restart of a dead engine or front end, no bound on a batch, no back-pressure but
the pipe's own buffer, no deadlines.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .report import bench_parser, figure, write_result

RECORD = struct.Struct("<QI")  # request id, rows
COUNT = struct.Struct("<I")
REQUESTS, ROWS, BATCHES, ENGINE_NS = range(4)


# -- the engine process -----------------------------------------------------------------------


def _engine_main(model_file: str, conns: list[Any], counters: Any, ready_file: str) -> None:
    from medserve.server.runtime import OnnxModel, SessionOptions

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source = Path(model_file).read_bytes()
    model = OnnxModel(source, SessionOptions(intra_op_threads=1), shown=Path(model_file).name)
    (inp,) = model.inputs
    dtype = np.dtype(np.float32 if inp.datatype == "FP32" else np.int64)
    row_shape = tuple(inp.shape[1:])
    probe = model({inp.name: np.zeros((1, *row_shape), dtype)})
    outputs = [{"name": o.name, "datatype": o.datatype, "row_shape": list(probe[o.name].shape[1:]),
                "dtype": probe[o.name].dtype.str} for o in model.outputs]
    facts = {"input": inp.name, "input_datatype": inp.datatype, "input_dtype": dtype.str, "row_shape": list(row_shape),
             "outputs": outputs, "sha256": hashlib.sha256(source).hexdigest(), "engine_pid": os.getpid()}
    for conn in conns:
        conn.send(facts)
    row_bytes = int(np.prod(row_shape)) * dtype.itemsize
    Path(ready_file).write_text(json.dumps({"pid": os.getpid()}))
    names = [o["name"] for o in outputs]
    live = list(conns)
    while live:
        arrived: list[tuple[Any, list[tuple[int, int]], list[memoryview]]] = []
        ready: list[Any] = multiprocessing.connection.wait(live)
        for conn in ready:
            heads: list[tuple[int, int]] = []
            parts: list[memoryview] = []
            try:
                while conn.poll():
                    view = memoryview(conn.recv_bytes())
                    at = 0
                    while at < len(view):
                        rid, rows = RECORD.unpack_from(view, at)
                        at += RECORD.size
                        parts.append(view[at:at + rows * row_bytes])
                        heads.append((rid, rows))
                        at += rows * row_bytes
            except (EOFError, OSError):
                live.remove(conn)
            if heads:
                arrived.append((conn, heads, parts))
        if not arrived:
            continue
        blob = b"".join(p for _, _, ps in arrived for p in ps)
        batch = np.frombuffer(blob, dtype).reshape((-1, *row_shape))
        t0 = time.perf_counter_ns()
        result = model({inp.name: batch})
        counters[ENGINE_NS] += time.perf_counter_ns() - t0
        counters[BATCHES] += 1
        counters[ROWS] += batch.shape[0]
        start = 0
        for conn, heads, _ in arrived:
            rows = sum(r for _, r in heads)
            reply = [COUNT.pack(len(heads)), *(RECORD.pack(i, r) for i, r in heads)]
            reply += [np.ascontiguousarray(result[n][start:start + rows]).tobytes() for n in names]
            start += rows
            counters[REQUESTS] += len(heads)
            with contextlib.suppress(OSError):
                conn.send_bytes(b"".join(reply))


# -- a front-end process ----------------------------------------------------------------------


class FrontEnd:
    """ModelInfer parsed and decoded here, run by the engine; writes coalesced per loop turn."""

    def __init__(self, conn: Any, counters: Any, name: str, version: str) -> None:
        self.conn, self.counters, self.name, self.version = conn, counters, name, version
        self.facts = conn.recv()
        self.dtype = np.dtype(self.facts["input_dtype"])
        self.row_shape = tuple(self.facts["row_shape"])
        self.outputs = [(o["name"], o["datatype"], tuple(o["row_shape"]), np.dtype(o["dtype"])) for o in self.facts["outputs"]]
        self.pending: dict[int, asyncio.Future[tuple[int, list[bytes]]]] = {}
        self.outbox: list[bytes] = []
        self.next_id = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.conn.fileno(), self._read)

    def _flush(self) -> None:
        data, self.outbox = b"".join(self.outbox), []
        self.conn.send_bytes(data)

    def _read(self) -> None:
        while self.conn.poll():
            view = memoryview(self.conn.recv_bytes())
            (count,) = COUNT.unpack_from(view, 0)
            heads = [RECORD.unpack_from(view, COUNT.size + i * RECORD.size) for i in range(count)]
            at = COUNT.size + count * RECORD.size
            total = sum(r for _, r in heads)
            slices = []
            for _, _, shape, dtype in self.outputs:
                width = int(np.prod(shape)) * dtype.itemsize
                slices.append((at, width))
                at += total * width
            offset = 0
            for rid, rows in heads:
                parts = [bytes(view[base + offset * w: base + (offset + rows) * w]) for base, w in slices]
                offset += rows
                future = self.pending.pop(rid, None)
                if future is not None and not future.done():
                    future.set_result((rows, parts))

    async def infer(self, request: Any, context: Any) -> Any:
        import grpc

        from medserve.protos import grpc_service_pb2 as pb

        if len(request.inputs) != 1 or len(request.raw_input_contents) != 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model {self.name!r}: one raw input expected")
        data = request.raw_input_contents[0]
        try:
            array = np.frombuffer(data, self.dtype).reshape(tuple(request.inputs[0].shape))
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model {self.name!r}: input does not fit its shape")
        if array.shape[1:] != self.row_shape:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"model {self.name!r}: rows of shape {list(self.row_shape)} expected")
        assert self.loop is not None
        rid = self.next_id = self.next_id + 1
        future = self.loop.create_future()
        self.pending[rid] = future
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(RECORD.pack(rid, array.shape[0]) + data)
        rows, parts = await future
        response = pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=request.id)
        response.parameters["model_sha256"].string_param = self.facts["sha256"]
        for (name, datatype, shape, _), raw in zip(self.outputs, parts, strict=True):
            response.outputs.add(name=name, datatype=datatype, shape=(rows, *shape))
            response.raw_output_contents.append(raw)
        return response

    async def statistics(self, request: Any, context: Any) -> Any:
        from medserve.protos import grpc_service_pb2 as pb

        c = self.counters
        stats = pb.ModelStatisticsResponse()
        s = stats.model_stats.add(name=self.name, version=self.version, inference_count=c[ROWS],
                                  execution_count=c[BATCHES])
        s.inference_stats.success.count = c[REQUESTS]
        s.inference_stats.compute_infer.count = c[BATCHES]
        s.inference_stats.compute_infer.ns = c[ENGINE_NS]
        return stats

    async def metadata(self, request: Any, context: Any) -> Any:
        from medserve.protos import grpc_service_pb2 as pb

        response = pb.ModelMetadataResponse(name=self.name, versions=[self.version], platform="onnxruntime_onnx")
        response.inputs.add(name=self.facts["input"], datatype=self.facts["input_datatype"], shape=(-1, *self.row_shape))
        for name, datatype, shape, _ in self.outputs:
            response.outputs.add(name=name, datatype=datatype, shape=(-1, *shape))
        return response


def _frontend_main(host: str, port: int, conn: Any, counters: Any, name: str, version: str, ready_file: str) -> None:
    import grpc

    from medserve.protos import grpc_service_pb2 as pb

    from . import reuseport

    async def run() -> None:
        front = FrontEnd(conn, counters, name, version)
        front.start()

        def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                       response_serializer=resp.SerializeToString)

        handlers = {
            "ModelInfer": unary(front.infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelMetadata": unary(front.metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelStatistics": unary(front.statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
        }
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService",
                                                                              handlers),))
        server.add_insecure_port(f"{host}:{port}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reuseport.write_ready(Path(ready_file), port=port, pid=os.getpid())
        await stop.wait()
        await server.stop(0.5)

    asyncio.run(run())


def serve(model_file: Path, frontends: int, host: str, port: int, ready_file: Path | None, name: str,
          version: str) -> int:
    """The engine and `frontends` front ends on one port; until SIGTERM (no restarts)."""
    from medserve.server.workers import reserve_port

    from . import reuseport

    ctx = multiprocessing.get_context("spawn")
    pairs = [ctx.Pipe(duplex=True) for _ in range(frontends)]
    counters = ctx.RawArray("q", 4)
    reservation = reserve_port(host, port)
    port = reservation.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="medserve-shared-") as tmp:
        engine = ctx.Process(target=_engine_main, args=(str(model_file), [a for a, _ in pairs], counters,
                                                        f"{tmp}/engine.json"), name="medserve-engine", daemon=True)
        engine.start()
        fronts = [ctx.Process(target=_frontend_main, args=(host, port, b, counters, name, version, f"{tmp}/f{i}.json"),
                              name=f"medserve-front-{i}", daemon=True) for i, (_, b) in enumerate(pairs)]
        for f in fronts:
            f.start()
        stopping = False

        def stop(_sig: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        files = [Path(tmp) / "engine.json", *(Path(tmp) / f"f{i}.json" for i in range(frontends))]
        procs = [engine, *fronts]
        while not stopping and not all(f.exists() for f in files):
            if not all(p.is_alive() for p in procs):
                stopping = True
                break
            time.sleep(0.05)
        reservation.close()
        if not stopping and ready_file is not None:
            reuseport.write_ready(ready_file, port=port, pid=os.getpid(), workers=[p.pid for p in fronts],
                                  engine=engine.pid)
        while not stopping and all(p.is_alive() for p in procs):
            time.sleep(0.2)
        for p in fronts:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        for p in fronts:
            p.join(10)
        engine.terminate()
        engine.join(10)
    return 0


# -- the measurement --------------------------------------------------------------------------


@contextlib.contextmanager
def shared_server(model_file: Path, frontends: int, log_dir: Path) -> Iterator[Any]:
    from .serverproc import start_process

    ready = log_dir / f"shared-ready-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "medserve.perf.shared_engine", "serve", "--model-file", str(model_file),
           "--frontends", str(frontends), "--ready-file", str(ready)]
    with start_process(cmd, ready, log_dir / f"shared-{time.monotonic_ns()}.log") as handle:
        yield handle


def compare_rows(results: dict[str, Any], frontends: int) -> list[dict[str, Any]]:
    """Per level: each configuration's throughput and mean batch, and shared / independent."""
    out = []
    configs = {c["name"]: c for c in results["configs"]}
    for lv in configs["shared"]["levels"]:
        row: dict[str, Any] = {"level": lv["level"], "frontends": frontends}
        for name, cfg in configs.items():
            x = next((v for v in cfg["levels"] if v["level"] == lv["level"]), None)
            if x is None:
                continue
            batch = next((m.get("mean_batch") for m in (x.get("server_models") or {}).values()), None)
            if name == "independent":
                batch = 1.0  # the minimal handler runs each request on its own, inline
            row[name] = {"throughput_rps": x["throughput_rps"], "p50_us": x["latency_us"]["p50"],
                         "p99_us": x["latency_us"]["p99"], "mean_batch": batch, "server_cores": x["server_cpu_cores"],
                         "errors": sum(v for k, v in x["statuses"].items() if k != "OK")}
        ind, sh = row.get("independent"), row.get("shared")
        row["shared_over_independent"] = (round(sh["throughput_rps"] / ind["throughput_rps"], 3)
                                          if ind and sh and ind["throughput_rps"] else None)
        # Repetitions ran back to back per level: the median of the paired ratios resists drift.
        paired = next((c["throughput_ratio_paired_median"] for c in results.get("comparisons", [])
                       if c["other"] == "shared" and c["baseline"] == "independent" and c["level"] == lv["level"]), None)
        row["shared_over_independent_paired"] = paired
        out.append(row)
    return out


def bench(argv: list[str] | None) -> int:
    parser = bench_parser("shared_engine", __doc__)
    parser.add_argument("--frontends", type=int, default=2, help="N: front ends of the engine, and independent workers")
    parser.add_argument("--levels", default="8,64,256")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--measure-s", type=float, default=3.0)
    parser.add_argument("--repetitions", type=int, default=1, help="measurements per level (interleaved)")
    parser.add_argument("--no-medserve", action="store_true", help="leave medserve --workers N out")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="a model folder of a repository (one input, e.g. demo-repository/digits_cnn) instead "
                             "of the 100-tree forest")
    args = parser.parse_args(argv)
    from . import serverproc
    from .bench_batching import build_repository
    from .measure import executor_round_trip_us
    from .runner import Runner
    from .scenario import ModelLoad, Scenario, Target

    levels = tuple(float(v) for v in args.levels.split(","))
    started = time.time()
    hand_off = executor_round_trip_us()
    n = args.frontends
    with tempfile.TemporaryDirectory(prefix="medserve-shared-bench-") as tmp, contextlib.ExitStack() as stack:
        repo, work = Path(tmp) / "repo", Path(tmp) / "work"
        work.mkdir()
        if args.model is None:
            print("training and exporting the forest ...", file=sys.stderr)
            build_repository(repo)
            name = "rf_on"
        else:
            import shutil

            name = args.model.resolve().name
            shutil.copytree(args.model, repo / name)
        model_file = repo / name / "1" / "model.onnx"
        independent = stack.enter_context(serverproc.minimal_server(model_file, n, log_dir=work))
        shared = stack.enter_context(shared_server(model_file, n, work))
        targets = [Target("independent", independent.address, pid=independent.pid, models=(name,),
                          generator="h2load"),
                   Target("shared", shared.address, pid=shared.pid, models=(name,), generator="h2load")]
        if not args.no_medserve:
            srv = stack.enter_context(serverproc.medserve(repo, n, log_dir=work))
            targets.append(Target("medserve", srv.address, pid=srv.pid, workers=n, models=(name,),
                                  repository=str(repo), generator="h2load"))
        scenario = Scenario(name=f"shared_engine-n{n}", mode="closed", levels=levels, warmup_s=args.warmup_s,
                            measure_s=args.measure_s, repetitions=args.repetitions, processes=1, channels=8,
                            models=(ModelLoad("model", batch=1, data="card"),), targets=tuple(targets))
        results = Runner(scenario, work_dir=work, progress=sys.stderr).run()
    rows = compare_rows(results, n)
    print(f"\nmachine: {os.cpu_count()} cores; thread hand-off {hand_off['median_us']} µs median")
    print(f"N = {n}: independent = minimal handler --workers {n} (a session each, every request run inline); "
          f"shared = {n} front ends + one engine process (one session, batching whatever arrived)"
          + ("" if args.no_medserve else f"; medserve = medserve serve --workers {n} ({name}, as configured)"))
    names = [t.name for t in targets]
    print(f"{'c':>4} " + " ".join(f"{nm + ' req/s':>18} {'batch':>6} {'p50 µs':>8}" for nm in names)
          + f" {'shared/indep':>12} {'paired':>7}")
    for r in rows:
        cells = []
        for nm in names:
            x = r.get(nm) or {}
            cells.append(f"{figure(x.get('throughput_rps')):>18} {figure(x.get('mean_batch'), 2):>6} "
                         f"{figure(x.get('p50_us')):>8}")
        print(f"{r['level']:>4g} " + " ".join(cells) + f" {figure(r['shared_over_independent'], 3):>12} "
              f"{figure(r['shared_over_independent_paired'], 3):>7}")
    for w in results["warnings"]:
        print(f"warning: {w}")
    path = write_result("shared_engine", {"args": {k: str(v) for k, v in vars(args).items()}, "model": name, "rows": rows,
                                          "sweep": results}, started_unix=started, out_dir=args.out,
                        hand_off_us=hand_off)
    print(f"\nresults: {path}  ({time.time() - started:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="python -m medserve.perf.shared_engine serve")
        parser.add_argument("--model-file", type=Path, required=True)
        parser.add_argument("--frontends", type=int, default=2)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=0)
        parser.add_argument("--ready-file", type=Path, default=None)
        parser.add_argument("--name", default=None)
        parser.add_argument("--version", default=None)
        args = parser.parse_args(argv[1:])
        path = args.model_file.resolve()
        return serve(path, args.frontends, args.host, args.port, args.ready_file, args.name or path.parent.parent.name,
                     args.version or path.parent.name)
    return bench(argv)


if __name__ == "__main__":
    sys.exit(main())
