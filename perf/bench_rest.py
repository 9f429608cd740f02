"""REST against gRPC on one model in one run: the same rows sent as a gRPC ModelInferRequest
(h2load over HTTP/2, the `perf.h2load` frame), as REST with Triton's binary tensor extension, and
as REST with JSON tensors (h2load over HTTP/1.1, one request in flight per connection), closed
loop at the same concurrency, to one `medserve serve` process. Every answer is checked: REST
failures are HTTP 4xx/5xx, gRPC's status is read from the server's statistics (`perf.h2load`),
and one request of each REST kind is answered and its output read before the load.

With `--mlserver-python PATH` (the python of a venv holding mlserver and mlserver-sklearn, kept
out of medserve's own: their pins would fight), a fourth column: MLServer's REST on the same
forest (breast_cancer_rf's version 1 retrained there as exporters/demo.py trains it, saved with
joblib, served by mlserver-sklearn answering predict_proba), the same JSON body, the same
concurrency and rows, interleaved with medserve's columns; both servers' probabilities are
compared on the breast_cancer rows first (the same model, or the run fails). Without it the
column says "not measured".

    python -m medserve.perf.bench_rest --repository demo-repository --model breast_cancer_rf \\
        --concurrency 64 --rows 1,64,1024 --seconds 10                # about a minute on 2 cores
    python3 -m venv /tmp/mlserver-venv && /tmp/mlserver-venv/bin/pip install mlserver==1.7.1 \\
        mlserver-sklearn==1.7.1 scikit-learn==1.9.1 uvloop==0.21.0    # then add:
        --mlserver-python /tmp/mlserver-venv/bin/python

(uvloop 0.22 and later stop MLServer 1.7.1's inference worker at its start, "There is no current
event loop" in mlserver/parallel/worker.py: SeldonIO/MLServer#2286, unreleased fix #2285.)

Figures go to perf/README.md ("REST against gRPC").
"""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import to_raw

from . import h2load
from .measure import executor_round_trip_us
from .report import bench_parser, write_result
from .serverproc import medserve, stop_process


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


NOT_MEASURED = "not measured: pass --mlserver-python"
MLSERVER_MODEL = "breast_cancer_rf"  # the one demo model retrained here: exporters/demo.py's forest
DEMO_SEED = 0  # build_demo_repository's default seed: version 1 of the forest
# Run by the MLServer venv's python: the forest exactly as exporters/demo.py trains version 1
# (same split, same estimator, same seed), saved with joblib for mlserver-sklearn.
TRAIN_FOREST = """
import sys, joblib
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split
seed = int(sys.argv[2])
data = load_breast_cancer()
x_train, _, y_train, _ = train_test_split(data.data, data.target, test_size=0.25, random_state=seed,
                                          stratify=data.target)
joblib.dump(RandomForestClassifier(100, random_state=seed, n_jobs=1).fit(x_train, y_train), sys.argv[1])
import mlserver, mlserver_sklearn, sklearn, uvloop
print(mlserver.__version__, sklearn.__version__, uvloop.__version__)
"""


def free_ports(n: int) -> list[int]:
    """n loopback ports free now (MLServer cannot bind port 0 and report it: a small race, held
    as short as possible by binding them all before closing any)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float = 30) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, {}, e.read()


def answer_outputs(headers: dict[str, str], payload: bytes) -> dict[str, dict[str, Any]]:
    """The outputs of a V2 answer, JSON or with binary tensors (the JSON header only)."""
    length = headers.get("inference-header-content-length")
    document = json.loads(payload[:int(length)] if length is not None else payload)
    return {o["name"]: o for o in document.get("outputs", [])}


def check_answer(url: str, body: bytes, headers: dict[str, str], output: str, rows: int) -> str:
    """"OK" when `url` answers 200 with `output` shaped [rows, 2]; else what was wrong (no values)."""
    status, answer_headers, payload = post(url, body, headers)
    if status != 200:
        return f"HTTP {status}"
    found = answer_outputs(answer_headers, payload).get(output)
    if found is None:
        return f"no output {output!r} in the answer"
    if list(found.get("shape", [])) != [rows, 2]:
        return f"output {output!r} shaped {found.get('shape')}, expected {[rows, 2]}"
    return "OK"


def probabilities(url: str, x: np.ndarray, output: str) -> np.ndarray:
    status, headers, payload = post(url, rest_json(x), {"content-type": "application/json"})
    if status != 200:
        raise RuntimeError(f"{url} answered HTTP {status}")
    found = answer_outputs(headers, payload)[output]
    return np.asarray(found["data"], dtype=np.float64).reshape(found["shape"])


def same_forest(medserve_url: str, mlserver_url: str) -> dict[str, Any]:
    """Both servers' probabilities on the 569 breast_cancer rows (as FP32): the same model or not."""
    from sklearn.datasets import load_breast_cancer
    x = load_breast_cancer().data.astype(np.float32)
    ours, theirs = probabilities(medserve_url, x, "probabilities"), probabilities(mlserver_url, x, "predict_proba")
    diff = float(np.max(np.abs(ours - theirs))) if ours.shape == theirs.shape else float("inf")
    return {"rows": len(x), "max_abs_diff": diff, "same_model": diff <= 1e-5}


@contextlib.contextmanager
def mlserver(python: Path, directory: Path, model: str, timeout_s: float = 180) -> Iterator[dict[str, Any]]:
    """Train the forest with `python`, write MLServer's settings, run `mlserver start` on free
    loopback ports until its model is ready; yield what was run, stop it with SIGTERM."""
    directory.mkdir(parents=True, exist_ok=True)
    trained = subprocess.run([str(python), "-c", TRAIN_FOREST, str(directory / "model.joblib"), str(DEMO_SEED)],
                             capture_output=True, text=True, timeout=300, check=False)
    if trained.returncode != 0:
        raise RuntimeError(f"training the forest with {python} failed:\n{trained.stderr[-2000:]}")
    versions = trained.stdout.split()
    http_port, grpc_port, metrics_port = free_ports(3)
    settings = {"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
                "debug": False}
    model_settings = {"name": model, "implementation": "mlserver_sklearn.SKLearnModel",
                      "parameters": {"uri": "./model.joblib", "version": "1", "extra": {"predict_fn": "predict_proba"}}}
    (directory / "settings.json").write_text(json.dumps(settings))
    (directory / "model-settings.json").write_text(json.dumps(model_settings))
    log_path = directory / "mlserver.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(python.parent / "mlserver"), "start", str(directory)], cwd=directory,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        ready = f"http://127.0.0.1:{http_port}/v2/models/{model}/ready"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlserver exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(ready, timeout=2) as answer:
                    if answer.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlserver not ready after {timeout_s:.0f} s (log: {log_path})")
            time.sleep(0.2)
        yield {"http_port": http_port, "mlserver": versions[0] if versions else "?",
               "scikit_learn": versions[1] if len(versions) > 1 else "?",
               "uvloop": versions[2] if len(versions) > 2 else "?", "settings": settings,
               "model_settings": model_settings, "parallel_workers": "MLServer's default (1)"}
    finally:
        stop_process(proc)


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
    p.add_argument("--mlserver-python", type=Path, default=None,
                   help="python of a venv with mlserver and mlserver-sklearn: adds MLServer's REST on the same forest")
    args = p.parse_args(argv)
    if args.mlserver_python is not None and args.model != MLSERVER_MODEL:
        print(f"--mlserver-python retrains {MLSERVER_MODEL} only", file=sys.stderr)
        return 2
    started = time.time()
    if h2load.find() is None:
        print("needs h2load (nghttp2-client)", file=sys.stderr)
        return 2
    hand_off = executor_round_trip_us()
    print(f"thread hand-off (one loop.run_in_executor round trip): {hand_off['median_us']} µs median", file=sys.stderr)
    results: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    mlserver_info: dict[str, Any] | str = NOT_MEASURED
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        server = stack.enter_context(medserve(
            args.repository, args=("--model-control-mode", "explicit", "--load-model", args.model),
            log_dir=Path(tmp)))
        assert server.http_port is not None
        path = f"/v2/models/{args.model}/versions/{args.version}/infer"
        theirs: dict[str, Any] | None = None
        if args.mlserver_python is not None:
            theirs = stack.enter_context(mlserver(args.mlserver_python, Path(tmp) / "mlserver", args.model))
            theirs["same_forest"] = same_forest(f"http://127.0.0.1:{server.http_port}{path}",
                                                f"http://127.0.0.1:{theirs['http_port']}/v2/models/{args.model}/infer")
            print(f"MLServer {theirs['mlserver']}: {json.dumps(theirs['same_forest'])}", file=sys.stderr)
            mlserver_info = theirs
        for rows in (int(r) for r in args.rows.split(",")):
            x = rng.normal(size=(rows, args.features)).astype(np.float32)
            frame = h2load.write_frame(grpc_body(args.model, args.version, x), Path(tmp) / f"grpc-{rows}.bin")
            binary, header = rest_binary(x)
            (Path(tmp) / f"bin-{rows}.bin").write_bytes(binary)
            (Path(tmp) / f"json-{rows}.json").write_bytes(rest_json(x))
            binary_headers = {"content-type": "application/octet-stream",
                              "inference-header-content-length": str(header)}
            json_headers = {"content-type": "application/json"}
            ours = f"http://127.0.0.1:{server.http_port}{path}"
            answers = {"rest_binary": check_answer(ours, binary, binary_headers, "probabilities", rows),
                       "rest_json": check_answer(ours, rest_json(x), json_headers, "probabilities", rows)}
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
            if theirs is not None:
                mlserver_path = f"/v2/models/{args.model}/infer"
                answers["mlserver_rest"] = check_answer(f"http://127.0.0.1:{theirs['http_port']}{mlserver_path}",
                                                        rest_json(x), json_headers, "predict_proba", rows)
                runs["mlserver_rest"] = lambda: rest_load(  # noqa: B023
                    theirs["http_port"], mlserver_path, Path(tmp) / f"json-{rows}.json",  # noqa: B023
                    ["content-type: application/json"], args.concurrency, args.warmup, args.seconds)
            row: dict[str, Any] = {"rows": rows, "concurrency": args.concurrency}
            for name, run in runs.items():
                out = run()
                answer = answers.get(name, "OK")
                row[name] = {"req_per_s": out["rps"], "rows_per_s": out["rps"] * rows,
                             "ok": out["ok"] and answer == "OK",
                             "latency_mean_ms": out.get("latency_us", {}).get("mean", float("nan")) / 1e3}
                if answer != "OK":
                    row[name]["answer"] = answer
                time.sleep(0.5)
            row["binary_over_grpc"] = row["rest_binary"]["req_per_s"] / row["grpc"]["req_per_s"]
            row["json_over_grpc"] = row["rest_json"]["req_per_s"] / row["grpc"]["req_per_s"]
            if theirs is None:
                row["mlserver_rest"] = NOT_MEASURED
            else:
                ml_rps = row["mlserver_rest"]["req_per_s"]
                row["binary_over_mlserver"] = row["rest_binary"]["req_per_s"] / ml_rps if ml_rps else float("inf")
                row["json_over_mlserver"] = row["rest_json"]["req_per_s"] / ml_rps if ml_rps else float("inf")
            print(json.dumps(row), flush=True)
            results.append(row)
    body = {"model": args.model, "version": args.version, "concurrency": args.concurrency, "seconds": args.seconds,
            "grpc_connections": args.grpc_connections, "mlserver": mlserver_info, "results": results}
    print(write_result("bench_rest", body, started_unix=started, out_dir=args.out, hand_off_us=hand_off))
    columns = ("grpc", "rest_binary", "rest_json") + (("mlserver_rest",) if theirs is not None else ())
    same = theirs is None or theirs["same_forest"]["same_model"]
    return 0 if same and all(r[k]["ok"] for r in results for k in columns) else 1



if __name__ == "__main__":
    raise SystemExit(main())
