"""The load harness against a real medserve server (in-process, port 0): both loop modes, the
results' structure and arithmetic, intended-time latency under overload, and error statuses.

Speed is never asserted; only relations that hold on any machine (counts add up, an overloaded
open loop's latency is far above the service time).
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from medserve.perf import report
from medserve.perf.cli import main as perf_main
from medserve.perf.runner import Runner
from medserve.perf.scenario import ModelLoad, Scenario, Target

import onnx_models
from conftest import running_server

SHORT = {"warmup_s": 0.3, "measure_s": 0.8, "drain_s": 10.0, "processes": 1, "channels": 2}


def _check_consistent(results: dict) -> None:
    """Counts add up at every level of every configuration and repetition."""
    assert results["schema"] == "medserve.perf/1"
    for cfg in results["configs"]:
        for lv in cfg["levels"]:
            assert sum(lv["statuses"].values()) == lv["requests"]
            assert lv["requests"] == sum(r["requests"] for r in lv["repetitions"])
            for rep in lv["repetitions"]:
                statuses = rep["statuses"]
                assert sum(statuses.values()) == rep["requests"]
                assert sum(m["requests"] for m in rep["per_model"].values()) == rep["requests"]
                ok = statuses.get("OK", 0)
                answered = rep["requests"] - statuses.get("INCOMPLETE", 0)
                # Throughput counts responses received in the window; in a closed loop that
                # differs from the requests started in it by at most the concurrency.
                assert rep["goodput_rps"] <= rep["ok_rps"] <= rep["throughput_rps"]
                if results["scenario"]["mode"] == "closed":
                    assert abs(rep["throughput_rps"] * rep["window_s"] - answered) <= rep["level"] + 1
                    assert abs(rep["ok_rps"] * rep["window_s"] - ok) <= rep["level"] + 1
                if ok:
                    lat = rep["latency_us"]
                    assert lat["count"] == ok
                    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]


@pytest.fixture
def affine_repo(make_repo) -> Path:
    batched = "max_batch_size: 32\ndynamic_batching { max_queue_delay_microseconds: 0 }\n"
    return make_repo(affine=(onnx_models.affine, batched), affine8=lambda p: onnx_models.affine(p, features=8))


def test_closed_loop_sweep_reports_consistent_counts_and_server_figures(affine_repo: Path, tmp_path: Path) -> None:
    with running_server(affine_repo) as srv:
        sc = Scenario(name="closed", mode="closed", levels=(1, 4), models=(ModelLoad("affine"),),
                      targets=(Target("medserve", srv.target),), **SHORT)
        results = Runner(sc, work_dir=tmp_path / "work", progress=None).run()
    _check_consistent(results)
    cfg = results["configs"][0]
    assert [lv["level"] for lv in cfg["levels"]] == [1, 4]
    for lv in cfg["levels"]:
        assert lv["statuses"] == {"OK": lv["requests"]} and lv["requests"] > 0
        rep = lv["repetitions"][0]
        server = rep["server"]["models"]["affine:1"]
        # The server answered what the client counted, give or take the edges of the window.
        assert abs(server["success"] - rep["requests"]) <= max(5, 0.1 * rep["requests"])
        assert server["mean_batch"] >= 1.0
        assert rep["harness"]["load_process_cores"][0] > 0
    assert cfg["levels"][0]["server_models"]["affine:1"]["mean_batch"] == 1.0  # c=1 never batches
    files = report.write_all(results, tmp_path / "out", "closed")
    assert json.loads(files["json"].read_text())["configs"][0]["name"] == "medserve"
    with files["csv"].open() as f:
        assert [r["level"] for r in csv.DictReader(f)] == ["1", "4"]
    assert files["png"].stat().st_size > 1000
    table = report.summary_table(results)
    assert "medserve" in table and "p99" in table


def test_open_loop_sends_at_the_offered_rate(affine_repo: Path, tmp_path: Path) -> None:
    with running_server(affine_repo) as srv:
        sc = Scenario(name="open", mode="open", arrival="fixed", levels=(200,), models=(ModelLoad("affine"),),
                      targets=(Target("medserve", srv.target),), **SHORT)
        results = Runner(sc, work_dir=tmp_path, progress=None).run()
    _check_consistent(results)
    rep = results["configs"][0]["levels"][0]["repetitions"][0]
    # A fixed schedule: exactly rate * window requests are due in the window (+-1 at the edges).
    assert abs(rep["requests"] - 200 * SHORT["measure_s"]) <= 1
    assert rep["offered_rps"] == 200
    assert rep["send_lag_us"]["count"] == rep["requests"]


def test_overloaded_open_loop_latency_counts_from_the_intended_send_time(make_repo, tmp_path: Path) -> None:
    """A slow model (batching off) offered twice what it can do: requests queue up, and
    latency measured from each request's intended send time grows far above the service time,
    while the generator itself stays on schedule."""
    repo = make_repo(slow=(lambda p: onnx_models.slow(p, width=2048, layers=24), "max_batch_size: 64\n"))
    with running_server(repo) as srv:
        probe = Scenario(name="probe", mode="closed", levels=(1,), models=(ModelLoad("slow"),),
                         targets=(Target("medserve", srv.target),), **{**SHORT, "measure_s": 0.5})
        service_us = Runner(probe, work_dir=tmp_path, progress=None).run()["configs"][0]["levels"][0][
            "latency_us"]["p50"]
        rate = round(3 * 1e6 / service_us)
        sc = Scenario(name="overload", mode="open", arrival="poisson", levels=(rate,), models=(ModelLoad("slow"),),
                      targets=(Target("medserve", srv.target),), **{**SHORT, "warmup_s": 0.0, "measure_s": 1.0})
        results = Runner(sc, work_dir=tmp_path, progress=None).run()
    _check_consistent(results)
    rep = results["configs"][0]["levels"][0]["repetitions"][0]
    assert rep["statuses"].get("OK", 0) > 0
    compute_us = rep["server"]["models"]["slow:1"]["compute_infer_us"]
    # Half the requests wait behind a backlog that grows for the whole window.
    assert rep["latency_us"]["p90"] > 10 * max(compute_us, service_us / 2)
    assert rep["send_lag_us"]["p50"] < rep["latency_us"]["p50"] / 10


@pytest.mark.parametrize("generator", ["python", "grpcio"])  # rawh2, grpc.aio load processes
def test_errors_become_status_counts_not_a_crash(affine_repo: Path, tmp_path: Path, generator: str) -> None:
    mix = (
        ModelLoad("affine", weight=2),
        ModelLoad("affine", send_as="no_such_model"),  # NOT_FOUND
        ModelLoad("affine", send_as="affine8"),  # shape [1, 4] for a [-1, 8] input: INVALID_ARGUMENT
    )
    with running_server(affine_repo) as srv:
        sc = Scenario(name="errors", mode="closed", levels=(4,), models=mix,
                      targets=(Target("medserve", srv.target, generator=generator),), **SHORT)
        results = Runner(sc, work_dir=tmp_path, progress=None).run()
    _check_consistent(results)
    cfg = results["configs"][0]
    assert cfg["preflight"]["no_such_model"].startswith("NOT_FOUND")
    assert cfg["preflight"]["affine8"].startswith("INVALID_ARGUMENT")
    rep = cfg["levels"][0]["repetitions"][0]
    assert set(rep["statuses"]) == {"OK", "NOT_FOUND", "INVALID_ARGUMENT"}
    assert rep["per_model"]["no_such_model"]["statuses"] == {"NOT_FOUND": rep["per_model"]["no_such_model"]["requests"]}
    assert rep["per_model"]["affine"]["statuses"] == {"OK": rep["per_model"]["affine"]["requests"]}
    assert rep["goodput_rps"] == rep["ok_rps"] < rep["throughput_rps"]
    assert "NOT_FOUND" in report.summary_table(results)
    assert rep["harness"]["generator"] == generator


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed (apt-get install nghttp2-client)")
def test_h2load_successes_are_the_servers_count_and_a_disagreement_is_flagged(make_repo, tmp_path: Path) -> None:
    """A queue of one in front of a model with one instance: under h2load's 16 streams most
    requests end RESOURCE_EXHAUSTED in the trailers of an HTTP 200, which h2load counts as a
    success. The preflight request (alone) is OK. The successes reported must be the server's
    own count, and the run must say that h2load disagreed."""
    repo = make_repo(slow=(lambda p: onnx_models.slow(p, width=256, layers=20), "max_batch_size: 0\n"))
    with running_server(repo, max_queue_size=1) as srv:
        sc = Scenario(name="h2-refused", levels=(16,), warmup_s=0.2, measure_s=0.6, channels=2,
                      models=(ModelLoad("slow"),), targets=(Target("h2", srv.target, generator="h2load"),))
        results = Runner(sc, work_dir=tmp_path, progress=None).run()
    cfg = results["configs"][0]
    assert cfg["preflight"] == {"slow": "OK"}
    rep = cfg["levels"][0]["repetitions"][0]
    server = rep["server"]["models"]["slow:1"]
    assert rep["harness"]["h2load_summary"]["requests"]["failed"] == 0  # what h2load itself says
    assert server["fail"] > 0 and server["success"] > 0
    assert rep["ok_rps"] == server["success_rps"]  # successes: the server's count over the same window
    assert rep["goodput_rps"] <= rep["ok_rps"] < rep["throughput_rps"]
    check = rep["h2load_vs_server"]
    assert (check["server_success"], check["server_fail"]) == (server["success"], server["fail"])
    assert check["source"] == "server" and check["agree"] is False
    assert check["difference"] == check["h2load_ok"] - server["success"] > 0
    assert sum(rep["statuses"].values()) == rep["requests"] and rep["statuses"]["FAILED"] > 0
    assert abs(rep["statuses"]["OK"] - server["success"]) <= max(5, 0.02 * rep["requests"])
    assert cfg["levels"][0]["h2load_vs_server"]["disagreeing_repetitions"] == 1
    assert any("h2load counted" in w and "the server" in w for w in results["warnings"])
    table = report.summary_table(results)
    assert "h2load DISAGREES with the server on h2 @ 16" in table and "warning: " in table


def test_deadlines_and_comparison_via_the_command_line(affine_repo: Path, tmp_path: Path, capsys) -> None:
    """From flags: a deadline no request can meet gives DEADLINE_EXCEEDED counts. From a TOML
    scenario: two targets measured in one run, ratios printed."""
    with running_server(affine_repo) as srv:
        rc = perf_main([
            "--target", f"a={srv.target}", "--model", "affine,deadline_ms=0.001", "--concurrency", "2",
            "--warmup-s", "0.2", "--measure-s", "0.5", "--channels", "1", "--out", str(tmp_path), "--quiet",
            "--no-plots", "--name", "cli",
        ])
        assert rc == 0
        rc = perf_main([
            "--target", f"a={srv.target}", "--repository", str(affine_repo), "--model", "affine", "--concurrency", "2",
            "--warmup-s", "0.2", "--measure-s", "0.3", "--channels", "1", "--out", str(tmp_path), "--quiet",
            "--no-plots", "--name", "cards",
        ])
        assert rc == 0
        toml = tmp_path / "s.toml"
        toml.write_text(
            f'name = "cmp"\nmode = "closed"\nlevels = [2]\nwarmup_s = 0.2\nmeasure_s = 0.5\nchannels = 1\n'
            f'[[model]]\nname = "affine"\n'
            f'[[target]]\nname = "base"\naddress = "{srv.target}"\n'
            f'[[target]]\nname = "other"\naddress = "{srv.target}"\nrepository = "{affine_repo}"\n',
            encoding="utf-8",
        )
        rc = perf_main(["--scenario", str(toml), "--out", str(tmp_path), "--quiet", "--no-plots"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "other / base" in out
    deadline = json.loads(sorted(tmp_path.glob("cli-*.json"))[0].read_text())
    _check_consistent(deadline)
    tight = deadline["configs"][0]["levels"][0]
    # gRPC core keeps deadlines in whole milliseconds: a 1 µs deadline is about 1 ms, which a fast
    # answer can meet.
    assert tight["statuses"].get("DEADLINE_EXCEEDED", 0) > 0 and set(tight["statuses"]) <= {"OK", "DEADLINE_EXCEEDED"}
    assert tight["goodput_rps"] == 0  # goodput only counts answers within the deadline
    results = json.loads(sorted(tmp_path.glob("cmp-*.json"))[0].read_text())
    _check_consistent(results)
    (cmp,) = results["comparisons"]
    assert (cmp["baseline"], cmp["other"]) == ("base", "other") and cmp["throughput_ratio"] > 0
    # `data = "card"` without the target's repository: the rows are [0, 1) and the run says so,
    # once per such target; a target whose repository is given reads the card and is not named.
    unread = [w for w in results["warnings"] if "no model card read" in w]
    assert len(unread) == 1 and "target 'base'" in unread[0], results["warnings"]
    assert any("no model card read for x" in w for w in deadline["warnings"]), deadline["warnings"]
    cards = json.loads(sorted(tmp_path.glob("cards-*.json"))[0].read_text())
    assert not [w for w in cards["warnings"] if "no model card read" in w], cards["warnings"]
    assert sorted(tmp_path.glob("cmp-*.csv"))
