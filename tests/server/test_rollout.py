"""The rollout's pure parts (labels file, canary assignment, trial figures) with explicit
inputs, and the canary against a real server: the share of routing keys within 1.5 points of
canary_percent, the same key always on the same version, and the routing key in no log line,
audit record, metric or answer."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from medserve.protos import grpc_service_pb2 as pb
from medserve.server.audit import keygen
from medserve.server.errors import ConfigError
from medserve.server.metrics import registry_for
from medserve.server.rollout import (
    CLASSIFICATION,
    DIFF_EDGES,
    REGRESSION,
    CanaryAssigner,
    RolloutSpec,
    TrialStats,
    check_ready,
    difference_deciles,
    output_kind,
    parse_rollout,
    psi,
)

import rollout_models
from conftest import running_server, wait_for
from rollout_models import request

# -- the labels file ------------------------------------------------------------------------


def test_a_labels_file_parses_with_its_canary_and_shadow() -> None:
    spec = parse_rollout("m/labels.json", b'{"stable": 1, "canary": 2, "canary_percent": 10, "shadow": "canary"}')
    assert spec == RolloutSpec({"stable": 1, "canary": 2}, 10.0, 2, None)
    assert spec.versions() == {1, 2}


@pytest.mark.parametrize(("text", "says"), [
    (b"[1]", "expected a JSON object"),
    (b"{", "not valid JSON"),
    (b'{"Stable": 1}', "label 'Stable' is not valid"),
    (b'{"7": 1}', "label '7' is not valid"),
    (b'{"stable": 0}', "label 'stable' must name a version number"),
    (b'{"stable": true}', "label 'stable' must name a version number"),
    (b'{"stable": 1, "canary_percent": 101}', "canary_percent must be a number from 0 to 100"),
    (b'{"stable": 1, "canary_percent": 5}', "no 'canary' label"),
    (b'{"stable": 1, "shadow": "nightly"}', "shadow must be a version number or one of the labels"),
    (b'{"stable": 1, "canary_seed": "short"}', "canary_seed must be a string of 8 to 256"),
    (b" " * (64 * 1024 + 1), "a labels file is at most"),
])
def test_a_bad_labels_file_is_refused_naming_the_entry(text: bytes, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rollout("m/labels.json", text)
    assert str(info.value).startswith("m/labels.json: ") and says in str(info.value)


def test_a_label_naming_a_version_that_is_not_ready_is_refused() -> None:
    check_ready("m/labels.json", RolloutSpec({"stable": 1}, shadow=2), [1, 2])
    with pytest.raises(ConfigError, match="label 'canary' points at version 3, which is not READY"):
        check_ready("m/labels.json", RolloutSpec({"stable": 1, "canary": 3}), [1, 2])
    with pytest.raises(ConfigError, match="shadow version 4 is not READY"):
        check_ready("m/labels.json", RolloutSpec({"stable": 1}, shadow=4), [1, 2])


# -- the canary -----------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [5.0, 10.0, 50.0])
def test_over_10000_keys_the_canary_share_is_within_15_points_and_each_key_stays(percent: float) -> None:
    for assigner in (CanaryAssigner(), CanaryAssigner.seeded("a seed of the rollout")):
        keys = [f"encounter-{i}" for i in range(10_000)]
        first = [assigner.is_canary(k, percent) for k in keys]
        share = 100 * sum(first) / len(keys)
        print(f"canary {percent} %: {share:.2f} % of 10,000 keys")
        assert abs(share - percent) <= 1.5
        assert [assigner.is_canary(k, percent) for k in keys] == first  # the same key, the same side


def test_a_seeded_canary_assigns_alike_in_every_server_and_an_unseeded_one_differs() -> None:
    keys = [f"e{i}" for i in range(2000)]
    a, b = CanaryAssigner.seeded("ward-7 rollout"), CanaryAssigner.seeded("ward-7 rollout")
    assert [a.bucket(k) for k in keys] == [b.bucket(k) for k in keys]
    assert [CanaryAssigner().bucket(k) for k in keys] != [CanaryAssigner().bucket(k) for k in keys]
    assert not any(CanaryAssigner().is_canary(k, 0) for k in keys)
    assert all(CanaryAssigner().is_canary(k, 100) for k in keys)


# -- the trial's figures --------------------------------------------------------------------


def test_trial_figures_for_known_answers() -> None:
    stats = TrialStats("m", 1, 2, "probabilities", CLASSIFICATION, window_rows=100)
    serving = np.array([[0.9, 0.1]] * 90 + [[0.2, 0.8]] * 10, np.float32)
    shadow = serving.copy()
    shadow[:10] = [[0.4, 0.6]]  # 10 rows flip, each by 0.5
    stats.compare(serving, shadow)
    assert (stats.rows, stats.agree, stats.agreement) == (100, 90, 0.9)
    deciles = difference_deciles(stats.differences)
    assert deciles[:9] == [0.0] * 9 and 0.5 <= deciles[9] <= 0.57
    assert stats.psi is not None and 0.6 < stats.psi < 0.65 and stats.windows == 1  # 20 of 200 scores to new tenths
    steady = TrialStats("m", 1, 2, "probabilities", CLASSIFICATION, window_rows=100)
    steady.compare(np.full((100, 2), [0.93, 0.07]), np.full((100, 2), [0.94, 0.06]))
    assert steady.psi == 0.0  # nearly equal scores of one stream of equal rows: no shift
    regression = TrialStats("m", 1, 2, "y", REGRESSION)
    regression.compare(np.arange(10.0), np.arange(10.0) + 0.25)
    assert regression.agreement is None and regression.rows == 10
    assert difference_deciles(regression.differences) == [DIFF_EDGES[np.searchsorted(DIFF_EDGES, 0.25)]] * 10


def test_psi_of_equal_samples_is_zero_and_of_shifted_ones_large() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=5000)
    assert psi(base, base) == 0.0
    assert psi(base, base + 1.0) > 0.5


def test_the_compared_output_and_its_kind() -> None:
    outputs = {"label": ("INT64", ()), "probabilities": ("FP32", (2,))}
    assert output_kind("classification", outputs) == ("probabilities", CLASSIFICATION)
    assert output_kind(None, outputs) == ("probabilities", CLASSIFICATION)
    assert output_kind("regression", {"prediction": ("FP32", (1,))}) == ("prediction", REGRESSION)
    assert output_kind(None, {"label": ("INT64", ())}) is None


# -- the canary against a real server --------------------------------------------------------


def test_the_canary_takes_its_share_of_routing_keys_and_a_key_always_meets_the_same_version(tmp_path: Path) -> None:
    labels = '{"stable": 1, "canary": 2, "canary_percent": 10, "canary_seed": "test rollout seed"}'
    repo = rollout_models.repo_with_versions(tmp_path / "repo", labels=labels)
    with running_server(repo) as srv:
        stub = srv.stub()
        first = {}
        for i in range(2000):
            answer = stub.ModelInfer(request(routing_key=f"encounter-{i}"))
            first[i] = (answer.model_version, answer.parameters["version_label"].string_param)
        again = {i: stub.ModelInfer(request(routing_key=f"encounter-{i}")).model_version for i in range(0, 2000, 10)}
        by_id = {stub.ModelInfer(request(request_id="visit-42")).model_version for _ in range(20)}
    share = 100 * sum(v == "2" for v, _ in first.values()) / len(first)
    print(f"canary share over 2,000 routing keys: {share:.2f} % (canary_percent 10)")
    assert abs(share - 10) <= 1.5
    assert {label for _, label in first.values()} == {"stable", "canary"}
    assert all(first[i][0] == v for i, v in again.items())
    assert len(by_id) == 1  # no routing key: the request id decides, always alike


def test_without_a_seed_every_worker_of_a_server_assigns_an_encounter_alike(tmp_path: Path) -> None:
    """`--workers 2` and a labels file without canary_seed: the supervisor draws one key for both
    workers, so an encounter meets the same version whichever worker its connection reaches. With
    a key per worker, 24 encounters at canary_percent 50 would all agree by chance once in 2**24."""
    import grpc

    from medserve.protos import grpc_service_pb2_grpc as pb_grpc

    from conftest import server_process

    repo = rollout_models.repo_with_versions(tmp_path / "repo",
                                             labels='{"stable": 1, "canary": 2, "canary_percent": 50}')
    keys = [f"encounter-{i}" for i in range(24)]
    seen: dict[str, dict[str, str]] = {"medserve-w0": {}, "medserve-w1": {}}  # worker -> key -> version
    with server_process(repo, "--workers", "2") as (port, _process):
        for _ in range(400):  # new connections until each worker has answered every key
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                worker = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name
                answered = seen[worker]
                if len(answered) == len(keys):
                    continue
                for key in keys:
                    answered[key] = stub.ModelInfer(request(routing_key=key), timeout=10).model_version
            if all(len(answered) == len(keys) for answered in seen.values()):
                break
        else:
            pytest.fail(f"not both workers reached in 400 connections: {[len(a) for a in seen.values()]}")
    assert seen["medserve-w0"] == seen["medserve-w1"]
    assert set(seen["medserve-w0"].values()) == {"1", "2"}  # both versions met: the assignment is not trivial


def test_the_routing_key_reaches_no_log_audit_record_metric_or_answer(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    sentinel = "ENCOUNTER-SENTINEL-4242"
    labels = '{"stable": 1, "canary": 2, "canary_percent": 50, "shadow": 2}'
    repo = rollout_models.repo_with_versions(tmp_path / "repo", labels=labels)
    keygen(tmp_path / "audit.key")
    audit = tmp_path / "audit.jsonl"
    caplog.set_level(logging.DEBUG)
    with running_server(repo, audit_log=str(audit), audit_key=str(tmp_path / "audit.key")) as srv:
        stub = srv.stub()
        answers = [stub.ModelInfer(request(routing_key=f"{sentinel}-{i}", request_id=f"r{i}")) for i in range(20)]
        long_key = request(routing_key=sentinel * 20)
        with pytest.raises(Exception) as info:  # over the length limit: refused without echoing it
            stub.ModelInfer(long_key)
        wait_for(lambda: audit.exists() and audit.read_text().count('"rpc":"ModelInfer"') == 21)
        metrics = generate_latest(registry_for(srv.server.repository, "w")).decode()
        metadata = str(stub.ModelMetadata(pb.ModelMetadataRequest(name="m")))
    assert {a.model_version for a in answers} == {"1", "2"}  # both sides were met
    texts = [caplog.text, audit.read_text(), metrics, metadata, str(info.value), *(str(a) for a in answers)]
    assert not [t[:200] for t in texts if "SENTINEL" in t]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {r["version"] for r in records if r.get("rpc") == "ModelInfer" and r["status"] == "OK"} <= {"1@stable",
                                                                                                      "2@canary"}
