"""Dynamic micro-batching benchmark: does batching pay on CPU, and how close does medserve come
to the Python gRPC transport's ceiling?

    python -m medserve.perf.bench_batching            # about 4 minutes on 2 cores
    python -m medserve.perf.bench_batching --measure-s 2 --levels 1,64 --workers 1
    python -m medserve.perf.bench_batching --build-repository perf/results/bench-repo   # repo only

What it does, in one run:
  1. builds a repository: a RandomForestClassifier (100 trees) and an MLP (scikit-learn
     MLPClassifier behind a StandardScaler), both trained on load_breast_cancer (30 features) and
     exported with skl2onnx (zipmap off, FP32 input [N, 30]); each in two variants:
     `<m>_off` (max_batch_size 64, no dynamic_batching) and `<m>_on` (dynamic_batching with
     max_queue_delay_microseconds 2000: an upper bound; a batch stops waiting at the crowd
     recent batches reached, so a lone request is not held back). Each version has a model card with the training data's
     feature ranges, from which the harness draws request data;
  2. for `medserve serve` with 1 and with 2 workers (metrics on: `--metrics-port 0`; audit off,
     as shipped): starts it, captures one real response of
     `rf_on`, and starts the two ceilings with as many processes as medserve has workers:
     `perf/fixed_server.py` answering with those bytes (the transport alone: no parsing, no
     model; the MLP's responses have the same size, so it serves as its ceiling too) and
     `perf/minimal_server.py` on rf_on's model file (a real handler with nothing else: parse
     the request, run the forest inline, encode the response; its response to the same request
     has the same size as medserve's, printed). It measures batch-1 requests at concurrency 1,
     8, 64, 256 with the `medserve.perf` harness driving h2load (pre-encoded gRPC frames;
     `--generator python` for the harness's own load process), all six configurations
     interleaved level by level;
  3. measures onnxruntime in-process (medserve's own `OnnxModel`, same session options) at the
     mean batch sizes the server actually formed (ModelStatistics);
  4. prints throughput, p50, p99, mean batch size, the ratios below and, per model, how many
     of the sweep's batches ran on the event loop's thread (the workers' Prometheus counters),
     and writes everything to perf/results/bench_batching-<time>.json.

Short mode (about 2-3 minutes on 2 cores): `--measure-s 2 --levels 1,64,256` (add `--models rf`
to leave the MLP out).

Targets (CPU; issue 29), batching on, the forest: medserve / minimal handler >= 0.9 at c=64 and
256 with 1 worker; medserve with 2 workers / fixed with 2 processes >= 0.9 at c=64 and 256;
batching on / off >= 1.0 at every concurrency >= 8; c=1 p50 <= minimal p50 + 100 µs. Printed
beside them, the earlier targets: medserve / fixed (1 process) >= 0.6 with 1 worker; mean batch
>= 4 at c=64 for the forest; c=1 p50 within 150 µs of fixed p50 + engine time.

Every run also measures this machine's thread hand-off (one `loop.run_in_executor` round trip)
and the host's other CPU use, and reports both beside the figures: machines of the same kind
differ (~100 µs on some, a fraction of that on others), and every figure says which it came from.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .measure import time_calls
from .report import bench_parser, figure, write_result

MODELS = ("rf", "mlp")
VARIANTS = ("off", "on")
CONFIG_OFF = 'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 64\n'
CONFIG_ON = CONFIG_OFF + "dynamic_batching {{ max_queue_delay_microseconds: 2000 }}\n"
TARGETS = {"fixed_ratio_1w": 0.6, "fixed_ratio_2w": 0.9, "minimal_ratio_1w": 0.9, "on_off": 1.0, "c1_overhead_us": 150.0,
           "c1_minimal_us": 100.0, "rf_batch_c64": 4.0}


# -- repository --------------------------------------------------------------------------------


def _train() -> tuple[dict[str, Any], np.ndarray, list[str]]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = data.target
    rf = RandomForestClassifier(n_estimators=100, random_state=0).fit(x, y)
    mlp = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=500, random_state=0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter
        mlp.fit(x, y)
    return {"rf": rf, "mlp": mlp}, x, [str(n) for n in data.feature_names]


def _to_onnx(model: Any) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    classifier = model.steps[-1][1] if hasattr(model, "steps") else model
    onx = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, 30]))],
                          options={id(classifier): {"zipmap": False}}, target_opset=17)
    return onx.SerializeToString()


def build_repository(root: Path) -> dict[str, Any]:
    """The four models (rf/mlp x batching off/on), each with a card holding feature ranges."""
    models, x, names = _train()
    lo, hi = x.min(axis=0), x.max(axis=0)
    ranges = {n: [float(a), float(b)] for n, a, b in zip(names, lo, hi, strict=True)}
    info: dict[str, Any] = {"samples": int(x.shape[0]), "features": int(x.shape[1])}
    for kind, model in models.items():
        onnx_bytes = _to_onnx(model)
        sha = hashlib.sha256(onnx_bytes).hexdigest()
        info[kind] = {"onnx_bytes": len(onnx_bytes), "sha256": sha}
        for variant in VARIANTS:
            name = f"{kind}_{variant}"
            version_dir = root / name / "1"
            version_dir.mkdir(parents=True, exist_ok=True)
            (version_dir / "model.onnx").write_bytes(onnx_bytes)
            card = {"name": name, "model_sha256": sha, "feature_names": names, "feature_ranges": ranges,
                    "class_labels": ["malignant", "benign"]}
            (version_dir / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
            template = CONFIG_ON if variant == "on" else CONFIG_OFF
            (root / name / "config.pbtxt").write_text(template.format(name=name), encoding="utf-8")
    return info


# -- onnxruntime in-process ------------------------------------------------------------------


def engine_us(model_path: Path, batch: int, seconds: float = 0.3) -> float:
    """Median µs of one run of medserve's own OnnxModel at `batch` rows (same session options)."""
    from medserve.server.runtime import OnnxModel, SessionOptions

    model = OnnxModel(model_path, SessionOptions(providers=("CPUExecutionProvider",)))
    rng = np.random.default_rng(0)
    feed = {"input": rng.random((batch, 30), dtype=np.float32) * 100}
    for _ in range(20):
        model(feed)
    return float(np.median(time_calls(lambda: model(feed), calls=50, seconds=seconds))) / 1e3


# -- the sweep -------------------------------------------------------------------------------


def _sweep(repo: Path, workers: int, levels: tuple[float, ...], warmup_s: float, measure_s: float,
           work: Path, repetitions: int = 1, generator: str = "h2load", models: tuple[str, ...] = MODELS) -> dict[str, Any]:
    from medserve.protos import grpc_service_pb2 as pb

    from . import serverproc
    from .fixed_server import capture
    from .runner import Runner
    from .scenario import ModelLoad, Scenario, Target, build_payloads, fetch_model_info

    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(serverproc.medserve(repo, workers, ("--metrics-port", "0"), log_dir=work))
        print(f"medserve serve --workers {workers}: {srv.address} (pid {srv.pid}, workers {srv.worker_pids})",
              file=sys.stderr)
        info = fetch_model_info(srv.address, "rf_on", repository=str(repo))
        body = build_payloads(info, ModelLoad("rf_on"), 1)[0]
        responses = capture(srv.address, "rf_on", body)
        # Both ceilings run as many processes as medserve has workers: the fixed response (the
        # transport alone) and the minimal handler (parse, the forest inline, encode).
        fixed = stack.enter_context(serverproc.fixed_server(srv.address, "rf_on", workers, log_dir=work))
        minimal = stack.enter_context(serverproc.minimal_server(repo / "rf_on" / "1" / "model.onnx", workers,
                                                                log_dir=work))
        sizes = {"medserve": len(responses["ModelInfer"]),
                 "minimal": len(capture(minimal.address, "rf_on", body)["ModelInfer"])}
        print(f"fixed server ({workers} process(es)): {fixed.address} ({sizes['medserve']}-byte response); "
              f"minimal handler ({workers} process(es)): {minimal.address} ({sizes['minimal']}-byte response "
              f"to the same request)", file=sys.stderr)
        if sizes["minimal"] != sizes["medserve"]:
            mine = pb.ModelInferResponse.FromString(responses["ModelInfer"])
            print(f"warning: the minimal handler's response differs in size from medserve's: {sizes} "
                  f"(medserve's parameters: {sorted(mine.parameters)})", file=sys.stderr)
        targets = [Target(f"{m}_{v}", srv.address, pid=srv.pid, workers=workers, models=(f"{m}_{v}",),
                          repository=str(repo), generator=generator) for m in models for v in VARIANTS]
        targets.append(Target("fixed", fixed.address, pid=fixed.pid, models=("rf_on",), generator=generator))
        targets.append(Target("minimal", minimal.address, pid=minimal.pid, models=("rf_on",), generator=generator))
        scenario = Scenario(
            name=f"bench_batching-w{workers}", mode="closed", levels=levels, warmup_s=warmup_s, measure_s=measure_s,
            repetitions=repetitions, processes=1, channels=8, models=(ModelLoad("model", batch=1, data="card"),), targets=tuple(targets),
        )
        result = Runner(scenario, work_dir=work, progress=sys.stderr).run()
        result["response_bytes"] = sizes
        result["executions"] = executions(srv.metrics_urls)
        return result


def executions(metrics_urls: list[str]) -> dict[str, dict[str, int]]:
    """Per model, the batches the server executed and how many of them on the event loop's
    thread (the cost model's choice; the rest went to an instance), summed over the workers."""
    from .measure import metric_totals

    batches = metric_totals(metrics_urls, "medserve_executions_total", "model")
    on_loop = metric_totals(metrics_urls, "medserve_executions_on_event_loop_total", "model")
    return {m: {"batches": int(n), "on_event_loop": int(on_loop.get(m, 0))} for m, n in sorted(batches.items())}


def _level(results: dict[str, Any], config: str, level: float) -> dict[str, Any] | None:
    cfg = next((c for c in results["configs"] if c["name"] == config), None)
    if cfg is None:
        return None
    return next((lv for lv in cfg["levels"] if lv["level"] == level), None)


def _mean_batch(lv: dict[str, Any]) -> float | None:
    models = lv.get("server_models") or {}
    return next((m.get("mean_batch") for m in models.values()), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _met(value: float | None, target: float, at_most: bool = False) -> bool:
    return value is not None and (value <= target if at_most else value >= target)


def _ratio_met(a: float | None, b: float | None, target: float) -> bool:
    """Whether a / b reaches `target`, unrounded (0.8996 does not meet 0.9)."""
    return a is not None and b is not None and b > 0 and a / b >= target


def ceiling_ratios(sweeps: dict[int, dict[str, Any]], levels: tuple[float, ...],
                   models: tuple[str, ...] = MODELS) -> dict[str, list[dict[str, Any]]]:
    """The issue's ratios from the sweeps (workers -> Runner results), each with its target and
    whether it was met (None: printed for reading, no target):
      minimal  medserve / minimal handler (the forest; targets: batching on, 1 worker, c=64/256)
      fixed    medserve / fixed response with as many processes (targets: batching on, c=64/256)
      ceilings minimal / fixed (how much of the transport a real handler keeps)
      on_off   batching on / off (targets at every c >= 8)
      batch    the forest's mean batch at c=64 with batching on
      c1_minimal  the forest's p50 at c=1 minus the minimal handler's p50, µs"""
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in ("minimal", "fixed", "ceilings", "on_off", "batch", "c1_minimal")}
    for workers, res in sweeps.items():
        for level in levels:
            fx, mn = _level(res, "fixed", level), _level(res, "minimal", level)
            if fx is not None and mn is not None and level in (64, 256):
                out["ceilings"].append({"workers": workers, "level": level,
                                        "ratio": _ratio(mn["throughput_rps"], fx["throughput_rps"]), "target": None,
                                        "met": None})
            for m in models:
                on, off = _level(res, f"{m}_on", level), _level(res, f"{m}_off", level)
                if on is None or off is None:
                    continue
                variants = (("on", on), ("off", off))
                if level in (64, 256) and fx is not None:
                    target = TARGETS["fixed_ratio_1w" if workers == 1 else "fixed_ratio_2w"]
                    for v, lv in variants:
                        r = _ratio(lv["throughput_rps"], fx["throughput_rps"])
                        out["fixed"].append({"workers": workers, "model": m, "variant": v, "level": level, "ratio": r,
                                             "target": target,
                                             "met": None if v == "off" else _ratio_met(lv["throughput_rps"],
                                                                                        fx["throughput_rps"], target)})
                if level in (64, 256) and mn is not None and m == "rf":
                    for v, lv in variants:
                        r = _ratio(lv["throughput_rps"], mn["throughput_rps"])
                        targeted = v == "on" and workers == 1
                        out["minimal"].append({"workers": workers, "model": m, "variant": v, "level": level,
                                               "ratio": r, "target": TARGETS["minimal_ratio_1w"] if targeted else None,
                                               "met": _ratio_met(lv["throughput_rps"], mn["throughput_rps"],
                                                                  TARGETS["minimal_ratio_1w"]) if targeted else None})
                r = _ratio(on["throughput_rps"], off["throughput_rps"])
                out["on_off"].append({"workers": workers, "model": m, "level": level, "ratio": r,
                                      "target": TARGETS["on_off"] if level >= 8 else None,
                                      "met": None if level < 8 else _ratio_met(on["throughput_rps"], off["throughput_rps"],
                                                                                       TARGETS["on_off"])})
                if m == "rf" and level == 64:
                    batch = _mean_batch(on)
                    out["batch"].append({"workers": workers, "level": level, "mean_batch": batch,
                                         "target": TARGETS["rf_batch_c64"], "met": _met(batch, TARGETS["rf_batch_c64"])})
                if m == "rf" and level == 1 and mn is not None:
                    for v, lv in variants:
                        p50, mp50 = lv["latency_us"]["p50"], mn["latency_us"]["p50"]
                        over = None if p50 is None or mp50 is None else round(p50 - mp50, 1)
                        out["c1_minimal"].append({"workers": workers, "model": m, "variant": v, "p50_us": p50,
                                                  "minimal_p50_us": mp50, "overhead_us": over,
                                                  "target_us": TARGETS["c1_minimal_us"],
                                                  "met": _met(over, TARGETS["c1_minimal_us"], at_most=True)})
    return out


def analyse(sweeps: dict[int, dict[str, Any]], repo: Path, levels: tuple[float, ...],
            models: tuple[str, ...] = MODELS) -> dict[str, Any]:
    """Rows per (workers, config, level) with the in-process engine figures, and the ratios."""
    engine: dict[tuple[str, int], float] = {}

    def engine_at(model: str, batch: int) -> float:
        key = (model, batch)
        if key not in engine:
            engine[key] = round(engine_us(repo / f"{model}_on" / "1" / "model.onnx", batch), 1)
        return engine[key]

    rows = []
    ratios: dict[str, Any] = {**ceiling_ratios(sweeps, levels, models), "c1": []}
    for workers, res in sweeps.items():
        for cfg in res["configs"]:
            for lv in cfg["levels"]:
                batch = _mean_batch(lv)
                row = {
                    "workers": workers, "config": cfg["name"], "level": lv["level"],
                    "throughput_rps": lv["throughput_rps"], "p50_us": lv["latency_us"]["p50"],
                    "p99_us": lv["latency_us"]["p99"], "mean_batch": batch,
                    "errors": sum(v for k, v in lv["statuses"].items() if k != "OK"),
                    "server_cores": lv["server_cpu_cores"], "harness_cores": lv["harness_cores"],
                }
                if batch:
                    b = max(1, round(batch))
                    us = engine_at(cfg["name"].split("_")[0], b)
                    row["engine_batch"] = b
                    row["engine_us"] = us
                    row["engine_rows_per_s"] = round(b / us * 1e6)
                rows.append(row)
        fx = _level(res, "fixed", 1)
        for m in models:
            on, off = _level(res, f"{m}_on", 1), _level(res, f"{m}_off", 1)
            if 1 not in levels or on is None or off is None or fx is None:
                continue
            eng = engine_at(m, 1)
            for v, lv in (("on", on), ("off", off)):
                p50, fp50 = lv["latency_us"]["p50"], fx["latency_us"]["p50"]
                over = None if p50 is None or fp50 is None else round(p50 - (fp50 + eng), 1)
                ratios["c1"].append({"workers": workers, "model": m, "variant": v, "p50_us": p50,
                                     "fixed_p50_us": fp50, "engine_us": eng, "overhead_us": over,
                                     "target_us": TARGETS["c1_overhead_us"],
                                     "met": _met(over, TARGETS["c1_overhead_us"], at_most=True)})
    return {"rows": rows, "ratios": ratios, "engine_us": {f"{m}@{b}": v for (m, b), v in engine.items()}}


def print_report(analysis: dict[str, Any]) -> None:
    print(f"{'w':>2} {'config':<8} {'c':>4} {'req/s':>8} {'p50 µs':>8} {'p99 µs':>8} {'batch':>6} {'err':>5} "
          f"{'srvCPU':>6} {'genCPU':>6} {'ORT@batch rows/s':>17}")
    for r in analysis["rows"]:
        eng = f"{r['engine_rows_per_s']:>9} @{r['engine_batch']:<3}" if "engine_us" in r else "-"
        print(f"{r['workers']:>2} {r['config']:<8} {r['level']:>4g} {r['throughput_rps']:>8.0f} {figure(r['p50_us']):>8} "
              f"{figure(r['p99_us']):>8} {figure(r['mean_batch'], 2):>6} {r['errors']:>5} {figure(r['server_cores'], 2):>6} "
              f"{figure(r['harness_cores'], 2):>6} {eng:>17}")
    ratios = analysis["ratios"]
    print("\nmedserve / minimal handler (parse, the forest inline, encode; as many processes as medserve's workers):")
    for x in ratios["minimal"]:
        mark = "" if x["met"] is None else f"  (target >= {x['target']})  {'met' if x['met'] else 'MISSED'}"
        print(f"  w{x['workers']} {x['model']}_{x['variant']:<3} c={x['level']:<4g} {figure(x['ratio'], 3):>6}{mark}")
    print("medserve / fixed response (as many processes as medserve's workers; target on batching-on rows):")
    for x in ratios["fixed"]:
        mark = "" if x["met"] is None else ("  met" if x["met"] else "  MISSED")
        print(f"  w{x['workers']} {x['model']}_{x['variant']:<3} c={x['level']:<4g} {figure(x['ratio'], 3):>6} "
              f"(target >= {x['target']}){mark}")
    print("minimal handler / fixed response (the two ceilings):")
    for x in ratios["ceilings"]:
        print(f"  w{x['workers']} c={x['level']:<4g} {figure(x['ratio'], 3):>6}")
    print("batching on / off throughput:")
    for x in analysis["ratios"]["on_off"]:
        verdict = "" if x["met"] is None else f"  (target >= {x['target']})  {'met' if x['met'] else 'MISSED'}"
        print(f"  w{x['workers']} {x['model']:<4} c={x['level']:<4g} {figure(x['ratio'], 3):>6}{verdict}")
    print("mean batch of the forest, batching on, c=64:")
    for x in analysis["ratios"].get("batch", []):
        print(f"  w{x['workers']} {figure(x['mean_batch'], 2):>6} (target >= {x['target']})  {'met' if x['met'] else 'MISSED'}")
    print("c=1 p50 - minimal handler p50:")
    for x in ratios["c1_minimal"]:
        print(f"  w{x['workers']} {x['model']}_{x['variant']:<3} p50 {figure(x['p50_us'])} µs, minimal "
              f"{figure(x['minimal_p50_us'])} -> {figure(x['overhead_us'])} µs (target <= {x['target_us']:g})"
              f"  {'met' if x['met'] else 'MISSED'}")
    print("c=1 p50 - (fixed p50 + engine time at batch 1):")
    for x in analysis["ratios"]["c1"]:
        print(f"  w{x['workers']} {x['model']}_{x['variant']:<3} p50 {figure(x['p50_us'])} µs, fixed {figure(x['fixed_p50_us'])}"
              f" + engine {figure(x['engine_us'], 1)} -> {figure(x['overhead_us'])} µs (target <= {x['target_us']:g})"
              f"  {'met' if x['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench_batching", __doc__)
    parser.add_argument("--levels", default="1,8,64,256", help="concurrencies (batch-1 requests)")
    parser.add_argument("--workers", default="1,2", help="server worker counts to measure")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--measure-s", type=float, default=3.0)
    parser.add_argument("--models", default=",".join(MODELS), help="among rf,mlp (the minimal handler serves rf)")
    parser.add_argument("--repetitions", type=int, default=1, help="measurements per level (interleaved)")
    parser.add_argument(
        "--generator", choices=("h2load", "python", "grpcio"), default="h2load",
        help="load generator: h2load (C, a tenth of a core here; default), the harness's Python processes over "
             "raw HTTP/2 (python) or over grpc.aio (grpcio)",
    )
    parser.add_argument("--build-repository", type=Path, default=None, metavar="DIR",
                        help="only build the four-model repository into DIR and exit")
    args = parser.parse_args(argv)
    if args.build_repository is not None:
        print(json.dumps(build_repository(args.build_repository), indent=1))
        return 0
    levels = tuple(float(v) for v in args.levels.split(","))
    models = tuple(m for m in args.models.split(",") if m)
    if not models or set(models) - set(MODELS):
        parser.error(f"--models {args.models!r}: expected some of {','.join(MODELS)}")
    from .measure import executor_round_trip_us

    hand_off = executor_round_trip_us()
    print(f"thread hand-off (one loop.run_in_executor round trip): {hand_off['median_us']} µs median", file=sys.stderr)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="medserve-bench-") as tmp:
        repo = Path(tmp) / "repo"
        work = Path(tmp) / "work"
        work.mkdir()
        print("training and exporting rf and mlp ...", file=sys.stderr)
        repo_info = build_repository(repo)
        sweeps = {}
        for w in (int(x) for x in args.workers.split(",")):
            sweeps[w] = _sweep(repo, w, levels, args.warmup_s, args.measure_s, work, args.repetitions, args.generator,
                               models)
        print("onnxruntime in-process at the mean batch sizes formed ...", file=sys.stderr)
        analysis = analyse(sweeps, repo, levels, models)
    print(f"machine: {os.cpu_count()} cores; thread hand-off {hand_off['median_us']} µs median "
          f"(loop.run_in_executor round trip, measured before the sweep)")
    for w, s in sweeps.items():
        sizes = s["response_bytes"]
        print(f"response to the same request, {w} worker(s): medserve {sizes['medserve']} bytes, minimal handler "
              f"{sizes['minimal']} bytes")
    print("batches on the event loop's thread, whole sweep, every level (medserve_executions_on_event_loop_total "
          "of medserve_executions_total):")
    for w, s in sweeps.items():
        print(f"  w{w} " + ", ".join(f"{m} {x['on_event_loop']:,} of {x['batches']:,}"
                                      for m, x in s["executions"].items() if x["batches"]))
    print_report(analysis)
    warnings = sorted({f"{n} workers: {x}" for n, s in sweeps.items() for x in s["warnings"]})
    for line in warnings:
        print(f"warning: {line}")
    body = {
        "generator": (
            "h2load (nghttp2): pre-encoded gRPC frames, closed loop"
            if args.generator == "h2load"
            else f"medserve.perf {args.generator} generator: 1 load process, "
            f"{'grpc.aio' if args.generator == 'grpcio' else 'raw HTTP/2 (perf.rawh2)'}, 8 channels, pre-encoded requests"
        ),
        "args": {k: str(v) for k, v in vars(args).items()},
        "repository": repo_info,
        "targets": TARGETS,
        **analysis,
        "warnings": warnings,
        "sweeps": {str(w): s for w, s in sweeps.items()},
    }
    path = write_result("bench_batching", body, started_unix=started, out_dir=args.out, hand_off_us=hand_off)
    print(f"\nresults: {path}  ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
