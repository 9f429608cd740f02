"""Harness pieces without a server: scenario files and flags, request building from model facts
and cards, h2load output parsing, histograms; plus h2load and the fixed server against a real
server when h2load is installed."""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from medserve.perf import h2load
from medserve.perf.loadgen import split_jobs
from medserve.perf.measure import FAILED, latency_summary, server_outcomes, stats_delta, status_name
from medserve.perf.runner import Runner
from medserve.perf.scenario import (
    ModelInfo,
    ModelLoad,
    Scenario,
    ScenarioError,
    Target,
    TensorInfo,
    build_payloads,
    feature_ranges,
    grpc_message,
    load_scenario,
    parse_levels,
    parse_model_flag,
)
from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import from_raw

import onnx_models
from conftest import running_server, wait_for


def test_scenario_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "mix"\nmode = "open"\nlevels = [100, 200]\narrival = "fixed"\nslo_ms = 20\n'
        '[[model]]\nname = "rf"\nbatch = 4\nweight = 3\ndeadline_ms = 50\npriority = 1\nshape = { x = [30] }\n'
        '[[model]]\nname = "mlp"\ndata = "random"\n'
        '[[target]]\nname = "a"\naddress = "127.0.0.1:1"\npid = 42\n'
        '[[target]]\nname = "b"\nserve = { repository = "models", workers = 2 }\nmodels = ["rf2", "mlp2"]\n',
        encoding="utf-8",
    )
    sc = load_scenario(path).validate()
    assert sc.mode == "open" and sc.levels == (100.0, 200.0) and sc.slo_ms == 20
    assert sc.models[0] == ModelLoad("rf", batch=4, weight=3, deadline_ms=50, priority=1, shape={"x": (30,)})
    b = sc.targets[1]
    assert b.serve is not None and b.serve.workers == 2 and b.serve.repository == str(tmp_path / "models")
    assert [m.model for m in sc.models_for(b)] == ["rf2", "mlp2"]
    assert sc.as_dict()["targets"][0]["pid"] == 42


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('levels = [1]\n[[model]]\nname = "m"\nbogus = 1\n', "unknown key 'bogus'"),
        ('mode = "half"\n[[model]]\nname = "m"\n[[target]]\naddress = "h:1"\n', "mode 'half'"),
        ('[[model]]\nname = "m"\n', "no target"),
        ('[[model]]\nname = "a"\n[[model]]\nname = "b"\n[[target]]\naddress = "h:1"\ngenerator = "h2load"\n',
         "h2load generator drives one model"),
    ],
)
def test_bad_scenarios_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError, match=message):
        load_scenario(path).validate()


def test_flags() -> None:
    assert parse_levels("1,8,64") == (1, 8, 64)
    assert parse_levels("1:64:x4") == (1, 4, 16, 64)
    assert parse_levels("100:400:+100") == (100, 200, 300, 400)
    m = parse_model_flag("rf:2,batch=8,weight=0.5,deadline_ms=10,priority=2,data=zeros,send_as=other")
    assert (m.model, m.version, m.batch, m.weight, m.deadline_ms, m.priority, m.data, m.send_as) == (
        "rf", "2", 8, 0.5, 10.0, 2, "zeros", "other")
    with pytest.raises(ScenarioError, match="unknown option 'size'"):
        parse_model_flag("rf,size=3")


def test_requests_use_the_card_ranges_and_the_batch_size() -> None:
    card = {"feature_names": ["a", "b", "c"], "feature_ranges": {"a": [10, 11], "b": [-5, -4], "c": [0, 1e-3]}}
    info = ModelInfo("rf", "", (TensorInfo("x", "FP32", (-1, 3)), TensorInfo("k", "INT64", (-1, 1))), True, card)
    bodies = build_payloads(info, ModelLoad("rf", batch=5, priority=2), count=3)
    assert len(set(bodies)) == 3  # different data per variant
    req = pb.ModelInferRequest.FromString(bodies[0])
    assert req.model_name == "rf" and req.parameters["priority"].uint64_param == 2
    assert [list(t.shape) for t in req.inputs] == [[5, 3], [5, 1]]
    x = from_raw(req.raw_input_contents[0], "FP32", (5, 3))
    assert np.all((x[:, 0] >= 10) & (x[:, 0] <= 11)) and np.all((x[:, 1] >= -5) & (x[:, 1] <= -4))
    assert feature_ranges({"features": [{"name": "a", "min": 0, "max": 2}]}, 1).tolist() == [[0, 2]]
    assert feature_ranges(card, 4) is None  # width mismatch: fall back to random data
    with pytest.raises(ScenarioError, match="variable dims"):
        build_payloads(ModelInfo("v", "", (TensorInfo("s", "FP32", (-1, -1, 3)),), True), ModelLoad("v"), 1)


def test_h2load_output_parsing_and_frame() -> None:
    text = (
        "finished in 3.00s, 2994.00 req/s, 602.04KB/s\n"
        "requests: 11976 total, 12040 started, 11976 done, 11970 succeeded, 6 failed, 0 errored, 0 timeout\n"
        "status codes: 11970 2xx, 0 3xx, 6 4xx, 0 5xx\n"
        "time for request:     1.58ms     39.98ms     21.31ms      2.84ms    85.56%\n"
    )
    out = h2load.parse_output(text)
    assert out["rps"] == 2994.0 and out["requests"]["done"] == 11976 and out["requests"]["failed"] == 6
    assert out["http_codes"]["4xx"] == 6 and out["latency_us"] == {"min": 1580.0, "max": 39980.0, "mean": 21310.0}
    assert grpc_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert h2load.split_concurrency(64, 4) == (4, 16) and h2load.split_concurrency(6, 4) == (3, 2)
    with pytest.raises(h2load.H2LoadError):
        h2load.parse_output("h2load: connection refused")


def test_h2load_statuses_come_from_the_servers_count() -> None:
    """reconcile: h2load's HTTP statuses and completion times against the server's counts."""
    http = np.array([200] * 8 + [503, 200])
    end = np.arange(10) * 100  # completions at 0, 100, ... 900 µs
    window = (150.0, 950.0)  # the statistics were read at 150 and 950 µs: 7 HTTP 200s inside
    status, check = h2load.reconcile(http, end, window, 0, (7, 0))  # the server agrees
    assert status.tolist() == [0] * 8 + [2, 0]
    assert check == {"h2load_ok": 7, "server_success": 7, "server_fail": 0, "difference": 0, "agree": True,
                     "source": "server", "latency_mixed": False}
    status, check = h2load.reconcile(http, end, window, 0, (1, 8))  # RESOURCE_EXHAUSTED in the trailers
    assert (status == 0).sum() == 1 and (status == FAILED).sum() == 8 and status[8] == 2
    assert check["difference"] == 6 and check["agree"] is False and check["latency_mixed"]
    assert h2load.reconcile(http, end, window, 0, (3, 6))[1]["agree"] is True  # 4 apart: within the edge slack
    status, check = h2load.reconcile(http, end, window, 3, (0, 9))  # every request INVALID_ARGUMENT
    assert (status == 3).sum() == 9 and check["agree"] is False and not check["latency_mixed"]
    status, check = h2load.reconcile(http, end, window, 5, (0, 0))  # NOT_FOUND: no model counted it
    assert (status == 5).sum() == 9 and check["source"] == "preflight" and check["agree"] is False
    status, check = h2load.reconcile(http, end, window, 0, None)  # no statistics (the fixed server)
    assert (status == 0).sum() == 9 and check["agree"] is None and check["source"] == "preflight"
    before = {"m:1": {"success_count": 3, "fail_count": 1}, "other:1": {"success_count": 50}}
    after = {"m:1": {"success_count": 10, "fail_count": 4}, "m:2": {"success_count": 2},
             "other:1": {"success_count": 90}}
    assert server_outcomes(before, after, "m") == (9, 3)
    assert server_outcomes(before, after, "m", "1") == (7, 3)
    assert server_outcomes(before, after, "gone") == (0, 0) and server_outcomes(None, after, "m") is None
    assert status_name(FAILED) == "FAILED"


def test_measure_helpers() -> None:
    s = latency_summary(np.arange(1, 10001, dtype=np.int64) * 1000)  # 1..10000 µs
    assert s["count"] == 10000 and abs(s["p50"] - 5000) <= 5 and abs(s["p99"] - 9900) <= 10 and s["max"] >= 9990
    assert latency_summary(np.zeros(0, np.int64))["p50"] is None
    assert status_name(0) == "OK" and status_name(5) == "NOT_FOUND" and status_name(-1) == "INCOMPLETE"
    before = {"m:1": {"inference_count": 10, "execution_count": 10, "success_count": 10, "queue_count": 10,
                      "queue_ns": 1000}}
    after = {"m:1": {"inference_count": 110, "execution_count": 35, "success_count": 110, "queue_count": 110,
                     "queue_ns": 201000}}
    d = stats_delta(before, after, 2.0)
    assert d is not None
    assert d["m:1"]["mean_batch"] == 4.0 and d["m:1"]["queue_us"] == 2.0 and d["m:1"]["success_rps"] == 50.0
    assert split_jobs(5, 0, 2) == [(3, 0.0, 0.0), (2, 0.0, 0.0)]
    assert split_jobs(0, 100.0, 2) == [(0, 50.0, 0.0), (0, 50.0, 0.01)]


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed (apt-get install nghttp2-client)")
def test_h2load_generator_and_fixed_server(make_repo, tmp_path: Path) -> None:
    """h2load beside the Python generator on one server (the saturation check's shape), and the
    fixed-response server answering with the real model's bytes."""
    from medserve.perf.fixed_server import capture, serve
    from medserve.perf.scenario import fetch_model_info

    repo = make_repo(affine=onnx_models.affine)
    with running_server(repo) as srv:
        sc = Scenario(name="h2", levels=(4,), warmup_s=0.2, measure_s=0.6, channels=2,
                      models=(ModelLoad("affine"),),
                      targets=(Target("py", srv.target), Target("h2", server_of="py", generator="h2load")))
        results = Runner(sc, work_dir=tmp_path, progress=None).run()
        body = build_payloads(fetch_model_info(srv.target, "affine"), ModelLoad("affine"), 1)[0]
        fixed = capture(srv.target, "affine", body)
    h2 = results["configs"][1]
    assert h2["generator"] == "h2load"
    rep = h2["levels"][0]["repetitions"][0]
    assert rep["harness"]["grpc_status_check"]["status"] == 0
    assert rep["statuses"] == {"OK": rep["requests"]} and rep["requests"] > 0
    assert rep["server"]["models"]["affine:1"]["success"] > 0
    assert results["comparisons"][0]["throughput_ratio"] > 0
    response = pb.ModelInferResponse.FromString(fixed["ModelInfer"])
    assert response.model_name == "affine" and [o.name for o in response.outputs] == ["y", "s"]

    # The fixed server answers the same requests with those bytes and has no statistics.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stop = asyncio.Event()
    ready = tmp_path / "fixed.json"
    serving = asyncio.run_coroutine_threadsafe(serve(fixed, ready_file=ready, stop=stop), loop)
    try:
        wait_for(ready.exists)
        address = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
        sc = Scenario(name="fixed", levels=(4,), warmup_s=0.2, measure_s=0.5, channels=1,
                      models=(ModelLoad("affine"),), targets=(Target("fixed", address),))
        rep = Runner(sc, work_dir=tmp_path, progress=None).run()["configs"][0]["levels"][0]["repetitions"][0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        serving.result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert rep["statuses"] == {"OK": rep["requests"]} and rep["requests"] > 0
    assert rep["server"]["models"] is None


def test_bench_monitor_copies_differ_only_in_the_monitor() -> None:
    """The monitored copies get a monitor whose limits refuse none of the generated rows; the
    plain copy gets none; the load generator draws the same rows for all three."""
    from medserve.perf.bench_monitor import COPIES, SWAPPED, copies_of
    from medserve.perf.scenario import card_rows, feature_ranges
    from medserve.server.monitor import FeatureMonitor

    names = ["a", "b", "c"]
    card = {"feature_names": names, "feature_ranges": {"a": [0.0, 1.0], "b": [-5.0, 5.0], "c": [100.0, 300.0]},
            "feature_deciles": {n: list(np.linspace(0, 1, 9)) for n in names}}
    cards = copies_of(card)
    assert set(cards) == set(COPIES) and sorted(SWAPPED.values()) == sorted(COPIES.values())
    ranges = feature_ranges(cards["monitored"], 3)
    rows = card_rows(cards["monitored"], (50, 3), np.float32, np.random.default_rng(0))
    assert rows is not None
    for role in ("monitored", "monitored_b"):
        monitor = FeatureMonitor.from_card(role, cards[role], {"x": (3,)})
        assert monitor is not None and cards[role]["feature_limits"]
        assert all(monitor.check({"x": row[None]}) == () for row in rows)
    assert FeatureMonitor.from_card("plain", cards["plain"], {"x": (3,)}) is None
    np.testing.assert_array_equal(feature_ranges(cards["plain"], 3), ranges)


def test_bench_explain_sets_aside_the_rounds_the_hypervisor_slowed_in_every_condition() -> None:
    """A round in which any phase lost more than QUIET_STEAL of its CPU time to the hypervisor
    leaves the quiet figures of every condition; the pooled and paired figures keep it."""
    from medserve.perf.bench_explain import QUIET_STEAL, summarize

    fast, slow = np.full(100, 0.004), np.full(100, 0.040)
    phases = {"alone": [fast, fast, fast], "beside": [fast * 1.2, slow, fast * 1.2]}
    cpu_s = 10.0
    limit_ms = QUIET_STEAL * cpu_s * 1e3
    stolen = {"alone": [0.0, 0.0, limit_ms], "beside": [limit_ms, limit_ms + 1, 0.0]}  # round 2 is not quiet
    rows = summarize(phases, stolen, cpu_s)
    beside = rows["beside"]
    assert rows["alone"]["quiet_rounds"] == beside["quiet_rounds"] == 2
    assert beside["p99_ratio"] == 10.0 and beside["p99_ratio_paired_median"] == 1.2
    assert beside["p99_ratio_quiet"] == 1.2 and beside["p99_quiet_us"] == 4800
    assert "p99_ratio" not in rows["alone"] and rows["alone"]["p99_quiet_us"] == 4000
    assert summarize(phases, {n: [limit_ms + 1] * 3 for n in phases}, cpu_s)["beside"].keys().isdisjoint(
        {"p99_quiet_us", "p99_ratio_quiet"})  # no quiet round: no quiet figure


def test_host_stolen_s_reads_the_steal_column_of_proc_stat() -> None:
    """host_stolen_s is /proc/stat's steal time (the 8th number of the "cpu" line, proc(5)), in
    seconds: read here independently before and after, it lies between (another column, or 0.0
    where the host steals, would not)."""
    import os

    from medserve.perf.measure import host_stolen_s

    def steal_s() -> float:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        assert fields[0] == "cpu"
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0

    before = steal_s()
    stolen = host_stolen_s()
    after = steal_s()
    print(f"stolen since boot: {stolen:.2f} s")
    assert before <= stolen <= after


def test_thread_schedstat_charges_a_threads_own_cpu_time() -> None:
    """The benchmark charges the server's event loop by its thread's schedstat: CPU time this
    thread spends shows up there, at finer grain than utime's ticks, and a sleep does not."""
    import os
    import time

    from medserve.perf.measure import thread_schedstat_s

    tid = threading.get_native_id()
    on0, wait0 = thread_schedstat_s(os.getpid(), tid)
    end = time.thread_time() + 0.03
    while time.thread_time() < end:
        pass
    on1, wait1 = thread_schedstat_s(os.getpid(), tid)
    time.sleep(0.05)
    on2, _ = thread_schedstat_s(os.getpid(), tid)
    assert 0.03 <= on1 - on0 < 1.0 and wait1 >= wait0
    assert on2 - on1 < 0.02


BENCHMARKS = ("bench_batching", "bench_client", "bench_explain", "bench_monitor", "bench_overload", "bench_rest",
              "bench_rows", "bench_text", "bench_transports", "request_path", "shared_engine")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_builds_its_command_line(name: str, capsys) -> None:
    """`--help` of each benchmark (its parser, its imports) and, where it writes a results
    folder, the shared `--out`."""
    import importlib

    module = importlib.import_module(f"medserve.perf.{name}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    assert ("--out" in text) == (name not in ("bench_client", "bench_transports"))


def test_one_result_envelope(tmp_path: Path) -> None:
    """Every benchmark's JSON starts the same: schema, start, duration, host (with what the
    benchmark adds), then its own figures; the file is named after the benchmark."""
    import time

    from medserve.perf.report import write_result

    started = time.time() - 2.0
    path = write_result("bench_x", {"figure": 1.5}, started_unix=started, out_dir=tmp_path / "out",
                        hand_off_us={"median_us": 3.0})
    assert path.parent == tmp_path / "out" and path.name.startswith("bench_x-") and path.suffix == ".json"
    result = json.loads(path.read_text())
    assert list(result)[:4] == ["schema", "started_unix", "duration_s", "host"]
    assert result["schema"] == "medserve.perf.bench_x/1" and result["figure"] == 1.5
    assert result["started_unix"] == round(started, 3) and 2.0 <= result["duration_s"] < 60
    assert result["host"]["cpus"] and result["host"]["python"] and result["host"]["hand_off_us"] == {"median_us": 3.0}
    named = write_result("bench_x", {}, started_unix=started, path=tmp_path / "given.json")
    assert named == tmp_path / "given.json" and json.loads(named.read_text())["schema"] == "medserve.perf.bench_x/1"


def test_in_process_timers_and_rss() -> None:
    """The hand-off timer and the call timer time what they are given; the RSS reader reads
    this process and counts a pid that is gone as nothing."""
    import os
    import time

    from medserve.perf.measure import executor_round_trip_us, rss_mib, time_calls

    hand_off = executor_round_trip_us(200)
    assert 0 < hand_off["median_us"] < 1e5 and hand_off["mean_us"] > 0
    times = time_calls(lambda: time.sleep(0.002), calls=5)
    assert len(times) == 5 and min(times) >= 2_000_000
    start = time.perf_counter()
    assert len(time_calls(int, seconds=0.05)) > 5 and time.perf_counter() - start >= 0.05
    gone = 2**22 + 7  # above Linux's largest pid_max: never a process
    own = rss_mib([os.getpid()])
    assert own > 10 and rss_mib([gone]) == 0
    # Read again beside the gone pid: this process's other threads may have touched a page since.
    assert abs(rss_mib([os.getpid(), gone]) - own) < 16
