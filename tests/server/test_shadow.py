"""Silent trials against a real server: the shadow's answers are never returned; a planted
difference (a version that flips a tenth of the predictions) reads agreement 0.90 and an
identical copy 1.0, in ModelMetadata's `trial` parameter, the Prometheus metrics and
`medserve trial report`; under load the shadow is shed first and every row is counted
(compared, shed or failed)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import from_raw, to_raw
from medserve.server.metrics import registry_for

import rollout_models
from conftest import running_server, wait_for


def request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x))
    return req


def trials(stub, model: str) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    params = stub.ModelMetadata(pb.ModelMetadataRequest(name=model)).parameters
    return json.loads(params["trial"].string_param) if "trial" in params else []


def test_a_planted_difference_reads_090_an_identical_copy_10_and_the_shadow_is_never_returned(
        tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    labels = '{"stable": 1, "shadow": 2}'
    rollout_models.repo_with_versions(repo, "flipped", (0.5, 0.6), labels)  # disagree on 0.5 < x < 0.6
    rollout_models.repo_with_versions(repo, "same", (0.5, 0.5), labels)
    x = rollout_models.grid(1000)
    with running_server(repo) as srv:
        stub = srv.stub()
        for model in ("flipped", "same"):
            for start in range(0, 1000, 10):
                answer = stub.ModelInfer(request(model, x[start:start + 10]))
                assert answer.model_version == "1" and answer.parameters["version_label"].string_param == "stable"
                assert [o.name for o in answer.outputs] == ["probabilities", "label"]  # no shadow output
                labels_out = from_raw(answer.raw_output_contents[1], "INT64", (10,))
                np.testing.assert_array_equal(labels_out, (x[start:start + 10, 0] > 0.5).astype(np.int64))
        for model in ("flipped", "same"):
            wait_for(lambda m=model: bool(trials(stub, m)) and trials(stub, m)[0]["rows"] == 1000)
        flipped, same = trials(stub, "flipped")[0], trials(stub, "same")[0]
        metrics = generate_latest(registry_for(srv.server.repository, "w")).decode()
        report = subprocess.run([sys.executable, "-m", "medserve.server.cli", "trial", "report", "flipped",
                                 "--target", srv.target, "--json"], capture_output=True, text=True, timeout=60)
        text = subprocess.run([sys.executable, "-m", "medserve.server.cli", "trial", "report", "flipped",
                               "--target", srv.target], capture_output=True, text=True, timeout=60)
    assert (flipped["serving"], flipped["shadow"], flipped["kind"]) == (1, 2, "classification")
    assert abs(flipped["agree"] / flipped["rows"] - 0.90) <= 0.01
    assert same["agree"] == same["rows"] == 1000
    assert flipped["shed_rows"] == same["shed_rows"] == 0 and flipped["failed_rows"] == 0
    assert flipped["psi"] is not None and same["psi"] == 0.0
    assert 'medserve_trial_rows_total{model="flipped",serving_version="1",shadow_version="2",worker="w"} 1000.0' in metrics
    assert 'medserve_trial_agreeing_rows_total{model="same",serving_version="1",shadow_version="2",worker="w"} 1000.0' in metrics
    assert report.returncode == 0, report.stderr
    (figures,) = json.loads(report.stdout)["trials"]
    assert abs(figures["agreement"] - 0.90) <= 0.01 and figures["rows_compared"] == 1000 and figures["rows_shed"] == 0
    # A tenth of the rows differ by about a probability of 0.55 (8 * 0.1 on the logit), the rest by less:
    assert figures["difference_deciles"][-1] > 0.3 and figures["difference_deciles"][7] < 0.6
    print(text.stdout)
    assert "agreement      0.9000" in text.stdout and "rows shed      0" in text.stdout


def test_under_load_the_shadow_is_shed_first_and_every_row_is_counted(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    rollout_models.threshold(repo / "m" / "1" / "model.onnx", 0.5)
    rollout_models.slow_threshold(repo / "m" / "2" / "model.onnx", 0.5)
    rollout_models.write_config_and_labels(repo, "m", '{"stable": 1, "shadow": 2}')
    with running_server(repo) as srv:
        failures: list[str] = []
        versions: set[str] = set()

        def load() -> None:
            stub = srv.stub()
            for _ in range(60):
                try:
                    versions.add(stub.ModelInfer(request("m", rollout_models.grid(16)), timeout=30).model_version)
                except Exception as exc:  # noqa: BLE001 - counted, asserted empty
                    failures.append(type(exc).__name__)

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stub = srv.stub()
        answered_rows = 8 * 60 * 16

        def settled() -> bool:
            t = trials(stub, "m")
            return bool(t) and t[0]["rows"] + t[0]["shed_rows"] + t[0]["failed_rows"] == answered_rows

        wait_for(settled, timeout_s=120)
        (trial,) = trials(stub, "m")
    print(f"rows compared {trial['rows']}, shed {trial['shed_rows']} ({trial['shed_requests']} requests), "
          f"failed {trial['failed_rows']}")
    assert failures == [] and versions == {"1"}
    assert trial["shed_rows"] > 0 and trial["failed_rows"] == 0
    assert trial["agree"] == trial["rows"]  # the same threshold: every compared row agrees
