"""Version labels (`labels.json`) against a real server: a label resolves in ModelInfer, ModelReady,
ModelMetadata, ModelConfig and ModelStatistics; every answer and audit record names the numeric
version and the label that reached it; a label change reloads no session; a label naming a
version that is not READY is refused with the reason while the old mapping serves; a label
switch and a rollback under load fail no request."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.server.audit import keygen

import rollout_models
from conftest import running_server, wait_for
from rollout_models import label_of, request


def write_labels(repo: Path, mapping: dict[str, object]) -> None:
    (repo / "m" / "labels.json").write_text(json.dumps(mapping))


def test_labels_resolve_in_every_rpc_and_answers_name_version_and_label(tmp_path: Path) -> None:
    repo = rollout_models.repo_with_versions(tmp_path / "repo", labels='{"stable": 1, "canary": 2}')
    with running_server(repo) as srv:
        stub = srv.stub()
        for asked, version, label in (("stable", "1", "stable"), ("canary", "2", "canary"), ("", "1", "stable"),
                                      ("2", "2", ""), ("1", "1", "")):
            answer = stub.ModelInfer(request(asked))
            assert (answer.model_version, label_of(answer)) == (version, label), asked
        assert stub.ModelReady(pb.ModelReadyRequest(name="m", version="canary")).ready
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="m", version="canary"))
        assert json.loads(metadata.parameters["version_labels"].string_param) == {"canary": 2, "stable": 1}
        assert stub.ModelConfig(pb.ModelConfigRequest(name="m", version="stable")).config.name == "m"
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="m", version="canary"))
        assert [s.version for s in stats.model_stats] == ["2"]
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request("nightly"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "labels ['canary', 'stable']" in (info.value.details() or "")


def test_a_model_without_labels_answers_as_before(tmp_path: Path) -> None:
    repo = rollout_models.repo_with_versions(tmp_path / "repo")
    with running_server(repo) as srv:
        answer = srv.stub().ModelInfer(request())
        assert (answer.model_version, "version_label" in answer.parameters) == ("2", False)
        assert srv.server.repository.routes == {}


def test_a_label_change_reloads_no_session_and_a_bad_one_is_refused_with_the_old_mapping_serving(
        tmp_path: Path) -> None:
    repo = rollout_models.repo_with_versions(tmp_path / "repo", labels='{"stable": 1}')
    with running_server(repo, model_control_mode="explicit", load_models=("*",)) as srv:
        stub = srv.stub()
        repository = srv.server.repository
        before = {v.version: v for v in repository.loaded_versions("m")}
        write_labels(repo, {"stable": 2})
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"))
        assert stub.ModelInfer(request("stable")).model_version == "2"
        assert {v.version: v for v in repository.loaded_versions("m")} == before  # the same sessions
        write_labels(repo, {"stable": 3})  # no version 3
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "label 'stable' points at version 3, which is not READY" in (info.value.details() or "")
        assert stub.ModelInfer(request("stable")).model_version == "2"  # the old mapping serves
        write_labels(repo, {"stable": "one"})  # not a version number
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "labels.json: label 'stable' must name a version number" in (info.value.details() or "")
        assert stub.ModelInfer(request("")).model_version == "2"
        assert {v.version: v for v in repository.loaded_versions("m")} == before


def test_poll_mode_picks_a_label_change_up_and_refuses_a_bad_one(tmp_path: Path) -> None:
    repo = rollout_models.repo_with_versions(tmp_path / "repo", labels='{"stable": 1}')
    with running_server(repo, model_control_mode="poll", repository_poll_s=3600) as srv:
        stub = srv.stub()
        before = set(srv.server.repository.loaded_versions("m"))
        write_labels(repo, {"stable": 2})
        srv.call(srv.server.repository.poll())
        assert stub.ModelInfer(request()).model_version == "2"
        write_labels(repo, {"stable": 7})
        srv.call(srv.server.repository.poll())
        assert (stub.ModelInfer(request()).model_version, label_of(stub.ModelInfer(request()))) == ("2", "stable")
        assert set(srv.server.repository.loaded_versions("m")) == before


def test_a_bad_label_refuses_the_first_load_naming_the_label(tmp_path: Path) -> None:
    repo = rollout_models.repo_with_versions(tmp_path / "repo", labels='{"stable": 1, "canary": 5}')
    with running_server(repo, model_control_mode="explicit") as srv:
        stub = srv.stub()
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "label 'canary' points at version 5" in (info.value.details() or "")
        assert not stub.ModelReady(pb.ModelReadyRequest(name="m")).ready
        write_labels(repo, {"stable": 1, "canary": 2})  # fixed: the next load serves
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"))
        assert stub.ModelInfer(request("canary")).model_version == "2"


def test_audit_records_name_the_version_and_the_label(tmp_path: Path) -> None:
    repo = rollout_models.repo_with_versions(tmp_path / "repo", labels='{"stable": 1, "canary": 2}')
    keygen(tmp_path / "audit.key")
    log = tmp_path / "audit.jsonl"
    with running_server(repo, audit_log=str(log), audit_key=str(tmp_path / "audit.key")) as srv:
        stub = srv.stub()
        stub.ModelInfer(request("canary", request_id="a"))
        stub.ModelInfer(request("1", request_id="b"))

        def records() -> list[dict[str, object]]:
            lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            return [r for r in lines if r.get("kind") == "call" and r.get("rpc") == "ModelInfer"]

        wait_for(lambda: len(records()) == 2)
    assert [(r["request_id"], r["version"]) for r in records()] == [("a", "2@canary"), ("b", "1")]


def test_a_label_switch_and_a_rollback_under_load_fail_no_request(tmp_path: Path) -> None:
    repo = rollout_models.repo_with_versions(tmp_path / "repo", labels='{"stable": 1, "canary": 2}')
    with running_server(repo, model_control_mode="explicit", load_models=("*",)) as srv:
        stop = threading.Event()
        failures: list[str] = []
        seen: list[set[str]] = []

        def load() -> None:
            stub = srv.stub()  # a channel of its own
            versions: set[str] = set()
            while not stop.is_set():
                try:
                    answer = stub.ModelInfer(request("stable"), timeout=10)
                    versions.add(answer.model_version)
                    assert label_of(answer) == "stable"
                except (grpc.RpcError, AssertionError) as exc:
                    failures.append(type(exc).__name__)
            seen.append(versions)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        admin = srv.stub()
        answered = srv.server.repository.loaded_versions
        for stable in (2, 1, 2, 1):  # switch, roll back, switch, roll back
            count = sum(v.stats.success.count for v in answered("m"))
            write_labels(repo, {"stable": stable, "canary": 2})
            admin.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"))
            wait_for(lambda c=count: sum(v.stats.success.count for v in answered("m")) > c + 150)
        stop.set()
        for t in threads:
            t.join(30)
        total = sum(v.stats.success.count for v in answered("m"))
    print(f"requests answered during 4 label changes: {total}; failed: {len(failures)}")
    assert failures == [] and total >= 600
    assert set().union(*seen) == {"1", "2"}
