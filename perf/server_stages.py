"""What each stage of a request costs inside a served process, under load: medserve and the
minimal handler run as servers (one worker each) with thread-CPU timers around their stages, and
h2load drives each in turn at every level.

    python -m medserve.perf.server_stages --repository demo-repository --model breast_cancer_rf
    python -m medserve.perf.server_stages --repository demo-repository --concurrency 1,64 --measure-s 4

`request_path` times the same stages in a tight loop with no transport; there the code and the
model's data stay in the CPU's caches. In a server every request's stages run between gRPC's
own work, and the same Python and the same onnxruntime call cost several times more (on the
2-core development VM: the forest's run 7 µs in the loop, 33-42 µs in a server). This tool
reads them where they are paid, so a cut can be judged by what it saves in a server.

Each stage is the thread CPU time (`time.thread_time_ns`) of a call, summed over every call from
the server's start to its stop (warm-up included) and divided by the calls: decode, validate,
the monitor, the batcher's `submit` (for a lone request it runs the batch inline, the engine
included), encode, onnxruntime's run, and the servicer's whole path (decode .. encode) where a
request finished without waiting; the minimal handler's whole `infer` and its run. Each timer
costs a wrapper call and two clock reads (a few µs in a server); `loop thread` is the event-loop
thread's CPU per request over the measured window, from /proc, timers included. The last
columns are `request_path`'s figure for the same code in a tight loop (run on the same model
after the servers) and the first server's figure over it. Needs `h2load` (nghttp2-client).
Writes perf/results/server_stages-<time>.json.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import h2load, serverproc
from .loop_profile import loaded_window, served_run
from .report import figure, finish_run, served_model_parser

# (module, attribute path, stage, coroutine?) per server; the server's own modules, imported
# before it starts so every call site looks the wrapper up.
STAGES: dict[str, tuple[tuple[str, str, str, bool], ...]] = {
    "medserve": (
        ("medserve.server.service", "InferenceServicer._infer", "servicer path (decode .. encode)", True),
        ("medserve.server.service", "decode_infer_request", "decode", False),
        ("medserve.server.service", "decode_fixed", "decode + validate, fixed signature", False),
        ("medserve.server.signature", "Signature.validate", "validate", False),
        ("medserve.server.monitor", "FeatureMonitor.check", "monitor", False),
        ("medserve.server.batching.driver", "Batcher.run_now", "batcher run_now (+ the engine)", False),
        ("medserve.server.batching.driver", "Batcher.submit", "batcher submit (+ the engine when inline)", False),
        ("medserve.server.service", "encode_infer_response", "encode", False),
        ("medserve.server.runtime", "OnnxModel._run", "onnxruntime run", False),
    ),
    "minimal": (
        ("medserve.perf.minimal_server", "Handler.infer", "handler (parse .. encode)", True),
        ("medserve.server.runtime", "OnnxModel._run", "onnxruntime run", False),
    ),
}
ENTRY = {"medserve": "medserve.server.cli", "minimal": "medserve.perf.minimal_server"}
# Each stage's counterpart in `request_path`'s in-process timings (the same code in a tight loop).
IN_PROCESS = {"decode": "decode", "decode + validate, fixed signature": "decode + validate, fixed signature",
              "validate": "validate", "monitor": "monitor", "encode": "encode + serialize",
              "onnxruntime run": "engine (OnnxModel)", "handler (parse .. encode)": "minimal (parse, run, encode)"}


class Tally:
    """Thread CPU nanoseconds and calls of one stage; `waited`: coroutine calls not counted
    because they suspended (their CPU would include other requests' work)."""

    __slots__ = ("ns", "calls", "waited")

    def __init__(self) -> None:
        self.ns = self.calls = self.waited = 0

    def as_dict(self) -> dict[str, float | int | None]:
        return {"us_per_call": round(self.ns / self.calls / 1e3, 2) if self.calls else None, "calls": self.calls,
                "waited": self.waited}


def timed(function: Callable[..., Any], tally: Tally) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time_ns()
        try:
            return function(*args, **kwargs)
        finally:
            tally.ns += time.thread_time_ns() - start
            tally.calls += 1

    return wrapper


class _FirstStep:
    """Awaits a coroutine as it is; its first step is timed and counted only if it finished the
    coroutine (a request that waited for a batch is left out: its thread CPU would include
    whatever else the event loop ran meanwhile)."""

    __slots__ = ("_coro", "_tally")

    def __init__(self, coro: Coroutine[Any, Any, Any], tally: Tally) -> None:
        self._coro, self._tally = coro, tally

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, start = self._coro, time.thread_time_ns()
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            self._tally.ns += time.thread_time_ns() - start
            self._tally.calls += 1
            return stop.value
        self._tally.waited += 1
        while True:  # the rest, passed through unchanged
            try:
                sent = yield yielded
            except BaseException as exc:  # noqa: BLE001 - thrown into the coroutine, as an await does
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def timed_coroutine(function: Callable[..., Coroutine[Any, Any, Any]], tally: Tally) -> Callable[..., Any]:
    @functools.wraps(function)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await _FirstStep(function(*args, **kwargs), tally)

    return wrapper


def install(stages: Sequence[tuple[str, str, str, bool]]) -> dict[str, Tally]:
    """Wrap each stage where it is looked up (a module global or a class attribute)."""
    tallies: dict[str, Tally] = {}
    for module_name, path, stage, coroutine in stages:
        owner: Any = importlib.import_module(module_name)
        *outer, attribute = path.split(".")
        for name in outer:
            owner = getattr(owner, name)
        tally = tallies.setdefault(stage, Tally())
        original = getattr(owner, attribute)
        setattr(owner, attribute, (timed_coroutine if coroutine else timed)(original, tally))
    return tallies


def child(server: str, out: Path, argv: list[str]) -> int:
    """The served process: the stages wrapped, then the server's own main; the tallies are
    written when it exits (after SIGTERM's drain)."""
    tallies = install(STAGES[server])
    atexit.register(lambda: out.write_text(json.dumps({k: t.as_dict() for k, t in tallies.items()}),
                                           encoding="utf-8"))
    main: Callable[[list[str]], int] = importlib.import_module(ENTRY[server]).main
    return main(argv)


@contextlib.contextmanager
def _served(server: str, repo: Path, model: str, work: Path,
            tag: str) -> Iterator[tuple[serverproc.ServerHandle, Path]]:
    out = work / f"stages-{server}-{tag}.json"
    entry = ("-m", "medserve.perf.server_stages", "--child", server, str(out), "--")
    if server == "medserve":
        context = serverproc.medserve(repo, log_dir=work, entry=entry)
    else:
        context = serverproc.minimal_server(repo / model / "1" / "model.onnx", log_dir=work, name=model,
                                            version="1", entry=entry)
    with context as handle:
        yield handle, out


def measure(repo: Path, model: str, levels: Sequence[int], warmup_s: float, measure_s: float,
            work: Path) -> list[dict[str, Any]]:
    """Every server at every level, each point in a freshly started server (its tallies are that
    point's alone)."""
    from .scenario import ModelLoad, build_payloads, fetch_model_info

    points: list[dict[str, Any]] = []
    frame: Path | None = None
    for level in levels:
        for server in STAGES:
            print(f"  {server} c={level} ...", file=sys.stderr)
            with _served(server, repo, model, work, str(level)) as (handle, out):
                if frame is None:  # the request: rows from the model card's ranges, medserve's metadata
                    body = build_payloads(fetch_model_info(handle.address, model, repository=str(repo)),
                                          ModelLoad(model), 1)[0]
                    frame = h2load.write_frame(body, work / "request.bin")
                point = loaded_window(handle.address, handle.pid, frame, level, warmup_s, measure_s, work, server)
                point.pop("requests_in_window")
            point["stages"] = json.loads(out.read_text(encoding="utf-8"))  # written at the server's exit
            points.append(point)
    return points


def in_process_us(repo: Path, model: str, work: Path) -> dict[str, float]:
    """`request_path`'s in-process stage timings of the same model (a subprocess, as it is run)."""
    done = subprocess.run([sys.executable, "-m", "medserve.perf.request_path", "--repository", str(repo),
                           "--model", model, "--out", str(work / "request_path")],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"request_path failed: {done.stderr[-2000:]}")
    (path,) = (work / "request_path").glob("request_path-*.json")
    stages: dict[str, float] = json.loads(path.read_text(encoding="utf-8"))["stages_us"]
    # (a stage the model has not, such as the monitor of a model without a card, reads 0: left out)
    return {stage: round(stages[name], 2) for stage, name in IN_PROCESS.items() if stages.get(name, 0) > 0}


def print_report(body: Mapping[str, Any]) -> None:
    print(f"thread hand-off {body['host']['hand_off_us']['median_us']} µs median; model {body['model']}; "
          "thread CPU µs per call inside each served process (timers included); in process: request_path's "
          "figure for the same code in a tight loop")
    loop = body.get("in_process_us") or {}
    for level in body["levels"]:
        points = {p["server"]: p for p in body["points"] if p["concurrency"] == level}
        print(f"\nc={level}{'':<38}" + "".join(f"{s:>12}" for s in points)
              + (f"{'in process':>12}{'ratio':>11}" if loop else ""))
        print(f"{'req/s':<44}" + "".join(f"{figure(p['throughput_rps']):>12}" for p in points.values()))
        print(f"{'loop thread per request (all)':<44}"
              + "".join(f"{p['loop_thread_us_per_request']:>12.1f}" for p in points.values()))
        stages = list(dict.fromkeys(s for p in points.values() for s in p["stages"]))
        for stage in stages:
            cells, served = [], []
            for p in points.values():
                tally = p["stages"].get(stage)
                if tally and tally["us_per_call"] is not None:
                    served.append(tally["us_per_call"])
                    cells.append(f"{tally['us_per_call']:>12.1f}")
                else:
                    cells.append(f"{'-':>12}")
            if loop:
                alone = loop.get(stage)
                cells.append(f"{alone:>12.1f}{served[0] / alone:>10.1f}x" if alone and served else f"{'-':>12}")
            print(f"{stage:<44}" + "".join(cells))
        waited = {s: p["stages"][next(iter(p["stages"]))]["waited"] for s, p in points.items()}
        print(f"{'(whole-path calls that waited, left out)':<44}" + "".join(f"{w:>12}" for w in waited.values()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        server, out, rest = argv[1], Path(argv[2]), argv[4:]  # --child SERVER OUT -- ARGS
        return child(server, out, rest)
    parser = served_model_parser("server_stages", __doc__)
    parser.add_argument("--no-in-process", dest="in_process", action="store_false",
                        help="leave out request_path's in-process column (about 15 s)")
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        print("server_stages needs h2load (nghttp2-client)", file=sys.stderr)
        return 2
    with served_run(args, "server-stages") as run:
        points = measure(run.repo, args.model, run.levels, args.warmup_s, args.measure_s, run.work)
        loop: dict[str, float] = {}
        if args.in_process:
            print("  request_path (in process) ...", file=sys.stderr)
            loop = in_process_us(run.repo, args.model, run.work)
    finish_run("server_stages", {"model": args.model, "levels": run.levels, "points": points,
                                 "in_process_us": loop}, args, run.started, print_report, hand_off_us=run.hand_off)
    return 0


if __name__ == "__main__":
    sys.exit(main())
