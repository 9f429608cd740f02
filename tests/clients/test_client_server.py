"""Every client call against a real medserve server (in-process, port 0), sync and asyncio."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medserve.clients import (
    AsyncClient,
    Client,
    InferRequest,
    InferResult,
    InvalidArgument,
    InvalidInputError,
    NotFound,
)

import onnx_models
from client_helpers import FEATURES, corrupt, sha256_file, tabular
from conftest import RunningServer, running_server


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("client-server") / "repo"
    onnx_models.affine(repo / "affine" / "1" / "model.onnx")
    onnx_models.affine(repo / "affine" / "2" / "model.onnx", features=2)
    onnx_models.write_config(repo, "affine", "version_policy { all {} }\n")
    onnx_models.strings(repo / "strings" / "1" / "model.onnx")
    onnx_models.affine(repo / "spare" / "1" / "model.onnx")
    tabular(repo, "tumour", FEATURES)
    tabular(repo, "nocard", None)
    corrupt(repo, "broken")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    with running_server(repo, exit_on_error=False, model_control_mode="explicit", load_models=("*",)) as s:
        yield s


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.target, timeout_s=30) as c:
        yield c


def inference_count(client: Client, model: str) -> int:
    return sum(s.inference_count for s in client.model_statistics(model))


def test_health(client: Client) -> None:
    assert client.server_live() is True
    assert client.server_ready() is True
    assert client.model_ready("affine") is True
    assert client.model_ready("affine", 1) is True
    assert client.model_ready("broken") is False
    with pytest.raises(NotFound):
        client.model_ready("no-such-model")


def test_server_and_model_metadata(client: Client, repo: Path) -> None:
    server = client.server_metadata()
    assert server.name == "medserve" and "statistics" in server.extensions
    meta = client.model_metadata("tumour")
    assert meta.name == "tumour" and meta.versions == ("1",)
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("x", "FP32", (-1, 3))]
    assert [t.name for t in meta.outputs] == ["y", "s"]
    assert meta.feature_names == FEATURES
    assert meta.class_labels == ("benign", "malignant")
    assert meta.model_sha256 == sha256_file(repo / "tumour" / "1" / "model.onnx")
    assert client.model_metadata("affine", version=1).inputs[0].shape == (-1, 4)
    assert client.model_metadata("affine").inputs[0].shape == (-1, 2)  # the server's choice: latest


def test_model_config(client: Client) -> None:
    config = client.model_config("tumour")
    assert config.name == "tumour" and config.max_batch_size > 0
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("x", "FP32", (3,))]
    assert config.feature_names == FEATURES
    assert config.raw.name == "tumour"  # the full Triton ModelConfig is there too
    assert client.model_config("strings").inputs[0].datatype == "BYTES"


def test_statistics_and_repository_index(client: Client) -> None:
    before = inference_count(client, "affine")
    client.infer("affine", {"x": np.zeros((3, 4), np.float32)}, version=1)
    stats = {s.version: s for s in client.model_statistics("affine")}
    assert set(stats) == {"1", "2"}
    assert sum(s.inference_count for s in stats.values()) == before + 3
    assert stats["1"].success.count >= 1 and stats["1"].success.ns > 0
    assert any(b.batch_size == 3 for b in stats["1"].batches)
    assert {s.name for s in client.model_statistics()} >= {"affine", "tumour"}
    index = {(m.name, m.version): m for m in client.repository_index()}
    assert index[("affine", "2")].state == "READY"
    assert index[("broken", "1")].state == "UNAVAILABLE" and "model.onnx" in index[("broken", "1")].reason
    assert "broken" not in {m.name for m in client.repository_index(ready=True)}


def test_unload_and_load(client: Client) -> None:
    client.unload_model("spare")
    assert not any(m.name == "spare" and m.state == "READY" for m in client.repository_index())
    client.load_model("spare")
    assert client.model_ready("spare")


def test_infer_numbers_ids_versions_and_traceability(client: Client, repo: Path) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = client.infer("affine", {"x": x}, version=1, request_id="enc-42", priority=1)
    assert isinstance(result, InferResult)
    np.testing.assert_array_equal(result["y"], 2 * x + 1)
    np.testing.assert_array_equal(result.as_numpy("s"), x.sum(axis=1, keepdims=True))
    assert (result.model_name, result.model_version, result.request_id) == ("affine", "1", "enc-42")
    assert result.model_sha256 == sha256_file(repo / "affine" / "1" / "model.onnx")
    assert dict(result).keys() == {"y", "s"}
    only_s = client.infer("affine", {"x": x[:, :2]}, outputs=["s"])
    assert only_s.model_version == "2" and list(only_s) == ["s"]


def test_bytes_round_trip(client: Client) -> None:
    text = np.array([["héllo wörld"], [b"abc"], [""]], dtype=object)
    result = client.infer("strings", {"text": text})
    assert result["upper"].dtype == object and result["upper"].shape == (3, 1)
    # UTF-8 survives both ways (the model's "C" locale upper-cases ASCII letters only).
    assert result["upper"][:, 0].tolist() == ["HéLLO WöRLD".encode(), b"ABC", b""]
    as_unicode = client.infer("strings", {"text": np.array([["a"], ["b"]])})  # numpy str dtype
    assert as_unicode["upper"].ravel().tolist() == [b"A", b"B"]


def test_infer_records_uses_the_models_column_order(client: Client, repo: Path) -> None:
    records = [
        {"age": 60, "mean texture": 20.5, "mean radius": 14.0},
        {"mean radius": 1.0, "age": 3, "mean texture": 2.0},
    ]
    result = client.infer_records("tumour", records, request_id="batch-1")
    # y = 2 x + 1 column by column in FEATURES order: radius, texture, age
    assert result["y"].tolist() == [[29.0, 42.0, 121.0], [3.0, 5.0, 7.0]]
    assert result.request_id == "batch-1"
    assert result.model_sha256 == sha256_file(repo / "tumour" / "1" / "model.onnx")


def test_infer_records_refuses_bad_records_before_sending(client: Client) -> None:
    before = inference_count(client, "tumour")
    with pytest.raises(InvalidInputError, match=r"record 1: missing \['age'\] and unknown \['agee'\]"):
        client.infer_records(
            "tumour",
            [{"mean radius": 1, "mean texture": 2, "age": 3}, {"mean radius": 1, "mean texture": 2, "agee": 3}],
        )
    with pytest.raises(InvalidInputError, match="record 0 feature 'age': a str value"):
        client.infer_records("tumour", [{"mean radius": 1, "mean texture": 2, "age": "sixty"}])
    with pytest.raises(InvalidInputError, match="publishes no feature_names"):
        client.infer_records("nocard", [{"a": 1}])
    assert inference_count(client, "tumour") == before


def test_infer_records_caches_metadata_per_model_and_version(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, Any]] = []
    original = client.model_metadata

    def counting(model: str, version: Any = None, **kwargs: Any) -> Any:
        calls.append((model, version))
        return original(model, version, **kwargs)

    monkeypatch.setattr(client, "model_metadata", counting)
    record = {"mean radius": 1, "mean texture": 2, "age": 3}
    for _ in range(3):
        client.infer_records("tumour", [record])
    client.infer_records("tumour", [record], version=1)
    assert calls == [("tumour", None), ("tumour", 1)]


def test_infer_records_notices_a_reloaded_model_with_new_columns(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tabular(repo, "tab", ("a", "b", "c"))
    with running_server(repo) as server, Client(server.target) as client:
        record = {"a": 1.0, "b": 2.0, "c": 3.0}
        assert client.infer_records("tab", [record])["y"].tolist() == [[3.0, 5.0, 7.0]]
        # The model is republished with another column order (a new file: another SHA-256).
        path = onnx_models.affine(repo / "tab" / "1" / "model.onnx", features=3, batch="B")
        from client_helpers import write_card

        write_card(path, feature_names=["c", "b", "a"])
        server.call(server.server.repository.load("tab"))  # reloaded behind this client's back
        result = client.infer_records("tab", [record])
        assert result["y"].tolist() == [[7.0, 5.0, 3.0]]
        assert result.model_sha256 == sha256_file(path)


def test_stream_pipelines_and_reports_errors_in_band(client: Client) -> None:
    x = np.ones((1, 4), np.float32)
    requests = [InferRequest("affine", {"x": x * i}, version=1, request_id=f"r{i}") for i in range(20)]
    requests.insert(5, InferRequest("affine", {"x": np.ones((1, 3), np.float32)}, version=1, request_id="bad-shape"))
    requests.insert(7, InferRequest("affine", {"x": np.array([1j])}, request_id="bad-dtype"))
    requests.append(InferRequest("no-such-model", {"x": x}, request_id="bad-model"))
    items = list(client.infer_stream(requests))
    assert len(items) == len(requests)
    results = {item.request_id: item for item in items if isinstance(item, InferResult)}
    errors = {item.request_id: item for item in items if not isinstance(item, InferResult)}
    assert set(results) == {f"r{i}" for i in range(20)}
    for i in range(20):
        np.testing.assert_array_equal(results[f"r{i}"]["y"], 2 * x * i + 1)
    assert set(errors) == {"bad-shape", "bad-dtype", "bad-model"}
    assert isinstance(errors["bad-shape"], InvalidArgument) and "expected shape" in errors["bad-shape"].message
    assert isinstance(errors["bad-dtype"], InvalidInputError)
    assert isinstance(errors["bad-model"], NotFound) and "no-such-model" in errors["bad-model"].message


def test_stream_numbers_requests_without_an_id(client: Client) -> None:
    x = np.ones((1, 4), np.float32)
    items = list(client.infer_stream(InferRequest("affine", {"x": x * i}, version=1) for i in range(3)))
    by_id = {item.request_id: item for item in items if isinstance(item, InferResult)}
    assert sorted(by_id) == ["0", "1", "2"]
    assert by_id["2"]["s"].tolist() == [[8.0]]


def test_async_client_has_the_same_calls(server: RunningServer) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)

    async def requests() -> AsyncIterator[InferRequest]:
        for i in range(5):
            yield InferRequest("affine", {"x": x + i}, version=1, request_id=f"a{i}")
            await asyncio.sleep(0)

    async def main() -> None:
        async with AsyncClient(server.target, timeout_s=30) as client:
            assert await client.server_live() and await client.server_ready()
            assert await client.model_ready("affine")
            assert (await client.server_metadata()).name == "medserve"
            assert (await client.model_metadata("tumour")).feature_names == FEATURES
            assert (await client.model_config("tumour")).max_batch_size > 0
            assert await client.model_statistics("affine")
            assert await client.repository_index(ready=True)
            await client.unload_model("spare")
            await client.load_model("spare")
            results = await asyncio.gather(
                *(client.infer("affine", {"x": x * i}, version=1, request_id=str(i)) for i in range(16))
            )
            for i, result in enumerate(results):
                assert result.request_id == str(i)
                np.testing.assert_array_equal(result["y"], 2 * x * i + 1)
            records = await client.infer_records("tumour", [{"age": 3, "mean texture": 2, "mean radius": 1}])
            assert records["y"].tolist() == [[3.0, 5.0, 7.0]]
            with pytest.raises(NotFound):
                await client.infer("no-such-model", {"x": x})
            items = [item async for item in client.infer_stream(requests())]
            assert sorted(i.request_id for i in items if isinstance(i, InferResult)) == [f"a{i}" for i in range(5)]

    asyncio.run(main())
