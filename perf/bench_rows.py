"""Multi-row requests: how many rows per second medserve serves when each request carries a
whole batch, against onnxruntime in process at that batch size (issue 29's multi-row targets).

    python -m medserve.perf.bench_rows                            # about 3 minutes on 2 cores
    python -m medserve.perf.bench_rows --measure-s 2 --levels 1,8 --text-measure-s 3   # short mode
    python -m medserve.perf.bench_rows --repository demo-repository --no-text

In one run:
  1. the forest and the digits CNN of the demo repository (`breast_cancer_rf`: FP32 [rows, 30];
     `digits_cnn`: FP32 [rows, 1, 8, 8]), copied from `--repository` or built fresh, served by
     one `medserve serve` (`--workers`, default 1) as exported (dynamic batching on);
  2. 32-row requests (`--rows`) of each, closed loop at each `--levels` concurrency, through the
     shared harness (perf/runner.py driving h2load; the models interleaved level by level):
     rows/s = requests/s x rows;
  3. onnxruntime in process on the same model file, medserve's own `OnnxModel` with the server's
     default session options (one intra-op thread), on one batch of `--rows` rows drawn as the
     harness draws them: rows/s = rows / mean seconds per run;
  4. the ratio medserve rows/s / in-process rows/s at each level (target >= 0.8), and beside it,
     in the same interleaved run, two ceilings per model: `fixed_server` answering with that
     model's real 32-row response (the transport alone) and `minimal_server` on its model file
     (parse, run inline, encode). When the fixed response itself stays under the target, no
     handler on this transport can meet it: the report says so;
  5. unless `--no-text`: the text Transformer (`notes_transformer`, one-row requests of
     clinical-note lengths, padded batching) at c=`--text-concurrency` (default 64) against
     onnxruntime in process at the batch sizes the server formed, measured by `bench_text`
     (its ratio, target >= 0.5).
Prints a table, writes perf/results/bench_rows-<time>.json (bench_text's own JSON beside it).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .measure import executor_round_trip_us, time_calls
from .report import bench_parser, figure, write_result

MODELS = ("breast_cancer_rf", "digits_cnn")
TEXT_MODEL = "notes_transformer"
TARGETS = {"rows_ratio": 0.8, "text_ratio": 0.5}


CEILINGS = ("fixed", "minimal")


def rows_ratios(points: list[dict[str, Any]], in_process: dict[str, float], rows: int,
                target: float = TARGETS["rows_ratio"]) -> list[dict[str, Any]]:
    """Per (model, level): medserve's rows/s (requests/s x rows), onnxruntime's in-process
    rows/s at `rows`, their ratio and whether it meets `target`. Points named `model:fixed` and
    `model:minimal` (the ceilings) are not rows of their own: each medserve point carries their
    rows/s at its level and their ratio to the in-process figure (`fixed_ratio`: the most any
    handler on this transport could reach)."""
    ceilings = {(p["model"], p["level"]): p["throughput_rps"] * rows for p in points if ":" in p["model"]}
    out = []
    for p in points:
        if ":" in p["model"]:
            continue
        served = p["throughput_rps"] * rows
        ref = in_process.get(p["model"])
        ratio = round(served / ref, 3) if ref else None
        point = {**p, "rows_per_s": round(served, 1), "in_process_rows_per_s": ref, "ratio": ratio,
                 "target": target, "met": bool(ref) and served / ref >= target}
        for name in CEILINGS:
            ceiling = ceilings.get((f"{p['model']}:{name}", p["level"]))
            point[f"{name}_rows_per_s"] = round(ceiling, 1) if ceiling is not None else None
            point[f"{name}_ratio"] = round(ceiling / ref, 3) if ceiling is not None and ref else None
        point["transport_bound"] = point["fixed_ratio"] is not None and point["fixed_ratio"] < target
        out.append(point)
    return out


def text_ratio(bench_text_result: dict[str, Any], concurrency: int, target: float = TARGETS["text_ratio"]) -> dict[str, Any]:
    """bench_text's padded Transformer point at `concurrency`: its ratio to onnxruntime in
    process at the batch size the server formed, against `target`."""
    point = next(p for p in bench_text_result["points"]
                 if p["model"] == TEXT_MODEL and p["variant"] == "padded" and p["concurrency"] == concurrency)
    ratio = point.get("ratio_to_in_process")
    return {"model": TEXT_MODEL, "concurrency": concurrency, "throughput_rps": point["throughput_rps"],
            "mean_batch": point["mean_batch"], "in_process_rows_per_s": (point.get("in_process") or {}).get("rows_per_s"),
            "ratio": ratio, "target": target, "met": ratio is not None and ratio >= target}


def in_process_rows_per_s(model_file: Path, feeds: dict[str, np.ndarray], seconds: float) -> float:
    """Rows per second of medserve's OnnxModel (the server's default session options) on `feeds`."""
    from medserve.server.runtime import OnnxModel, SessionOptions

    model = OnnxModel(model_file.read_bytes(), SessionOptions(intra_op_threads=1), shown=model_file.name)
    for _ in range(10):
        model(feeds)
    ns = time_calls(lambda: model(feeds), calls=20, seconds=seconds)
    rows = next(iter(feeds.values())).shape[0]
    return round(rows / (float(np.mean(ns)) / 1e9), 1)


def _feeds(body: bytes) -> dict[str, np.ndarray]:
    """The inputs of one serialized ModelInferRequest (raw contents), as the server decodes them."""
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos.wire import numpy_dtype

    req = pb.ModelInferRequest.FromString(body)
    return {t.name: np.frombuffer(raw, numpy_dtype(t.datatype)).reshape(tuple(t.shape))
            for t, raw in zip(req.inputs, req.raw_input_contents, strict=True)}


def prepare_repository(repo: Path, source: Path | None, models: tuple[str, ...]) -> None:
    """`models` copied from `source`, or trained and exported fresh (the demo builders)."""
    if source is None:
        from medserve.exporters.demo import build_demo_repository

        build_demo_repository(repo, models=list(models))
        return
    for m in models:  # version 1 as exported: no labels (no canary, no silent trial), no other version
        shutil.copytree(source / m, repo / m, ignore=lambda d, names, top=source / m: [
            n for n in names if Path(d) == top and (n == "labels.json" or (n.isdigit() and n != "1"))])


def measure_rows(repo: Path, models: tuple[str, ...], rows: int, levels: tuple[float, ...], workers: int,
                 warmup_s: float, measure_s: float, in_process_s: float, work: Path, generator: str,
                 repetitions: int = 1) -> dict[str, Any]:
    from . import serverproc
    from .runner import Runner
    from .scenario import ModelLoad, Scenario, Target, build_payloads, fetch_model_info

    load = ModelLoad("model", batch=rows, data="card")
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(serverproc.medserve(repo, workers, log_dir=work))
        targets = [Target(m, srv.address, pid=srv.pid, workers=workers, models=(m,), repository=str(repo),
                          generator=generator) for m in models]
        bodies = {m: build_payloads(fetch_model_info(srv.address, m, repository=str(repo)), ModelLoad(m, batch=rows,
                                                                                                      data="card"), 1)[0]
                  for m in models}
        for m in models:  # the ceilings, as many processes as medserve has workers
            fixed = stack.enter_context(serverproc.fixed_server(srv.address, m, workers, batch=rows, log_dir=work))
            minimal = stack.enter_context(serverproc.minimal_server(repo / m / "1" / "model.onnx", workers,
                                                                    log_dir=work, name=m, version="1"))
            targets += [Target(f"{m}:fixed", fixed.address, pid=fixed.pid, models=(m,), generator=generator),
                        Target(f"{m}:minimal", minimal.address, pid=minimal.pid, models=(m,), generator=generator)]
        scenario = Scenario(name="bench_rows", mode="closed", levels=levels, warmup_s=warmup_s, measure_s=measure_s,
                            repetitions=repetitions, processes=1, channels=8, models=(load,), targets=tuple(targets))
        results = Runner(scenario, work_dir=work, progress=sys.stderr).run()
    print(f"\nonnxruntime in process at batch {rows} ...", file=sys.stderr)
    in_process = {m: in_process_rows_per_s(repo / m / "1" / "model.onnx", _feeds(bodies[m]), in_process_s)
                  for m in models}
    points = []
    for cfg in results["configs"]:
        for lv in cfg["levels"]:
            batch = next((s.get("mean_batch") for s in (lv.get("server_models") or {}).values()), None)
            points.append({"model": cfg["name"], "level": lv["level"], "throughput_rps": lv["throughput_rps"],
                           "p50_us": lv["latency_us"]["p50"], "p99_us": lv["latency_us"]["p99"],
                           "mean_batch_rows": batch,
                           "errors": sum(v for k, v in lv["statuses"].items() if k != "OK"),
                           "server_cores": lv["server_cpu_cores"], "harness_cores": lv["harness_cores"],
                           "host_other_cores": lv["repetitions"][0].get("host_other_cores")})
    return {"points": rows_ratios(points, in_process, rows), "in_process_rows_per_s": in_process,
            "warnings": results["warnings"], "sweep": results}


def print_report(body: dict[str, Any]) -> None:
    rows = body["rows"]
    print(f"{'model':<18} {'c':>4} {'req/s':>8} {'rows/s':>9} {'ORT@' + str(rows) + ' rows/s':>15} {'ratio':>6} "
          f"{'fixed':>6} {'minim':>6} {'p50 µs':>8} {'p99 µs':>8} {'batch':>6} {'err':>4} {'srvCPU':>6} {'other':>6}")
    for p in body["points"]:
        verdict = f"  (target >= {p['target']}) {'met' if p['met'] else 'MISSED'}"
        if not p["met"] and p.get("transport_bound"):
            verdict += ": over the transport's ceiling"
        print(f"{p['model']:<18} {p['level']:>4g} {p['throughput_rps']:>8.0f} {p['rows_per_s']:>9.0f} "
              f"{figure(p['in_process_rows_per_s']):>15} {figure(p['ratio'], 3):>6} "
              f"{figure(p.get('fixed_ratio'), 3):>6} {figure(p.get('minimal_ratio'), 3):>6} {figure(p['p50_us']):>8} "
              f"{figure(p['p99_us']):>8} {figure(p['mean_batch_rows'], 2):>6} {p['errors']:>4} "
              f"{figure(p['server_cores'], 2):>6} {figure(p['host_other_cores'], 2):>6}{verdict}")
    print(f"batch: rows per executed batch (ModelStatistics: inference_count / execution_count); {rows} rows = "
          "one request per batch. other: cores used by neither server nor harness in the window (a busy host).")
    print(f"fixed / minim: the rows/s of the fixed {rows}-row response (the transport alone) and of the minimal "
          "handler (parse, run inline, encode), over the same in-process figure, in the same run. A target above "
          "the fixed response's ratio is over what any handler on this transport can serve.")
    text = body.get("text")
    if text:
        print(f"{text['model']} c={text['concurrency']} (padded, one-row requests): {figure(text['throughput_rps'])} req/s, "
              f"mean batch {figure(text['mean_batch'], 2)}, onnxruntime in process at that batch "
              f"{figure(text['in_process_rows_per_s'])} rows/s -> {figure(text['ratio'], 3)} "
              f"(target >= {text['target']}) {'met' if text['met'] else 'MISSED'}  [bench_text: {body['text_result']}]")
    for w in body.get("warnings", []):
        print(f"warning: {w}")


def _levels(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench_rows", __doc__)
    parser.add_argument("--repository", type=Path, default=None,
                        help="copy the models from this repository (default: build them fresh)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"among {','.join(MODELS)}")
    parser.add_argument("--rows", type=int, default=32, help="rows per request, and the in-process batch")
    parser.add_argument("--levels", type=_levels, default=(1, 8), help="concurrencies, e.g. 1,8")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--measure-s", type=float, default=3.0)
    parser.add_argument("--repetitions", type=int, default=1, help="measurements per level (interleaved)")
    parser.add_argument("--in-process-s", type=float, default=0.5, help="seconds of onnxruntime timing per model")
    parser.add_argument("--generator", choices=("h2load", "python", "grpcio"), default="h2load")
    parser.add_argument("--no-text", action="store_true", help="leave the text Transformer out")
    parser.add_argument("--text-concurrency", type=int, default=64)
    parser.add_argument("--text-measure-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    if not models or set(models) - set(MODELS):
        parser.error(f"--models {args.models!r}: expected some of {','.join(MODELS)}")
    started = time.time()
    hand_off = executor_round_trip_us()
    print(f"thread hand-off (one loop.run_in_executor round trip): {hand_off['median_us']} µs median", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="medserve-bench-rows-") as tmp:
        repo, work = Path(tmp) / "repo", Path(tmp) / "work"
        work.mkdir()
        print(f"models: {', '.join(models)} ({'from ' + str(args.repository) if args.repository else 'built fresh'}) ...",
              file=sys.stderr)
        prepare_repository(repo, args.repository, models)
        body: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": args.rows,
                                "targets": TARGETS}
        body.update(measure_rows(repo, models, args.rows, args.levels, args.workers, args.warmup_s, args.measure_s,
                                 args.in_process_s, work, args.generator, args.repetitions))
    if not args.no_text:
        from . import bench_text

        print(f"{TEXT_MODEL} at c={args.text_concurrency} (bench_text) ...", file=sys.stderr)
        text_argv = ["--models", TEXT_MODEL, "--concurrency", str(args.text_concurrency),
                     "--measure-s", str(args.text_measure_s), "--hand-off-calls", "2000"]
        if args.out is not None:
            text_argv += ["--out", str(args.out)]
        text_path, text_result = bench_text.run(text_argv)
        body["text"] = text_ratio(text_result, args.text_concurrency)
        body["text_result"] = str(text_path)
    print(f"machine: {os.cpu_count()} cores; thread hand-off {hand_off['median_us']} µs "
          f"median (loop.run_in_executor round trip, measured before the load)")
    print_report(body)
    path = write_result("bench_rows", body, started_unix=started, out_dir=args.out, hand_off_us=hand_off)
    print(f"\nresults: {path}  ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
