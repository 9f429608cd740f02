"""Unmodified `tritonclient.http` (JSON and binary tensors, metadata, config, statistics, index,
errors) and `perf_analyzer -i http` against a medserve process's KServe V2 REST port. Runs in the
child pytest of tests/test_compat_suite.py, as the gRPC compat tests do."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from medserve.perf.serverproc import medserve

import onnx_models
from perf_analyzer_run import perf_analyzer, run_perf_analyzer


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compat-http") / "repo"
    onnx_models.affine(root / "affine" / "1" / "model.onnx")
    onnx_models.write_config(root, "affine", "max_batch_size: 8\ndynamic_batching { }\n")
    onnx_models.strings(root / "strings" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def url(repo: Path) -> Iterator[str]:
    with medserve(repo, args=("--model-control-mode", "explicit", "--load-model", "*"), log_dir=repo.parent,
                  log_level="INFO") as handle:
        assert handle.http_port
        yield f"127.0.0.1:{handle.http_port}"


@pytest.fixture
def client(url: str) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(url)
    yield c
    c.close()


def test_health_metadata_config_statistics_index(client: th.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("affine") and client.is_model_ready("affine", "1")
    meta = client.get_server_metadata()
    assert meta["name"] == "medserve" and "statistics" in meta["extensions"]
    model = client.get_model_metadata("affine")
    assert model["versions"] == ["1"] and model["inputs"][0]["shape"] == [-1, 4]
    config = client.get_model_config("affine")
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config
    stats = client.get_inference_statistics("affine")["model_stats"]
    assert stats[0]["name"] == "affine" and "success" in stats[0]["inference_stats"]
    assert {m["name"] for m in client.get_model_repository_index()} == {"affine", "strings"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_onnxruntime(client: th.InferenceServerClient, repo: Path, binary: bool) -> None:
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    inp = th.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("y", "s")]
    result = client.infer("affine", [inp], outputs=outputs, request_id="abc")
    expected = ort.InferenceSession(str(repo / "affine" / "1" / "model.onnx")).run(None, {"x": x})
    np.testing.assert_allclose(result.as_numpy("y"), expected[0], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("s"), expected[1], rtol=1e-6)
    response = result.get_response()
    assert response["id"] == "abc" and response["model_version"] == "1"
    assert len(response["parameters"]["model_sha256"]) == 64


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_strings_round_trip(client: th.InferenceServerClient, binary: bool) -> None:
    words = np.array([[b"alpha"], [b"beta gamma"]], dtype=object)
    inp = th.InferInput("text", list(words.shape), "BYTES")
    inp.set_data_from_numpy(words, binary_data=binary)
    result = client.infer("strings", [inp], outputs=[th.InferRequestedOutput("upper", binary_data=binary)])
    got = result.as_numpy("upper").reshape(-1).tolist()  # JSON strings come back as str (as from Triton)
    assert [v if isinstance(v, bytes) else v.encode() for v in got] == [b"ALPHA", b"BETA GAMMA"]


def test_errors_are_triton_style(client: th.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert "no_such_model" in str(info.value) and info.value.status() == "404"
    bad = th.InferInput("x", [1, 3], "FP32")
    bad.set_data_from_numpy(np.full((1, 3), 1234.5, np.float32), binary_data=False)
    with pytest.raises(InferenceServerException) as info:
        client.infer("affine", [bad])
    assert "'x'" in str(info.value) and "1234" not in str(info.value) and info.value.status() == "400"


@pytest.mark.skipif(perf_analyzer() is None, reason="perf_analyzer (tritonclient wheel) not installed")
def test_perf_analyzer_over_http(url: str, tmp_path: Path) -> None:
    throughputs = run_perf_analyzer("http", url, tmp_path)
    assert len(throughputs) == 2 and all(t > 0 for t in throughputs)
