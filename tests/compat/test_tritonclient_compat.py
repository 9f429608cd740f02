"""Unmodified tritonclient (sync and asyncio) and Triton's perf_analyzer against a medserve
process. Runs in a child pytest (see tests/test_compat_suite.py): tritonclient's generated
modules cannot share a process with medserve's."""
from __future__ import annotations

import asyncio
import os
import queue
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException

import onnx_models
from conftest import server_process
from perf_analyzer_run import perf_analyzer, run_perf_analyzer

assert "medserve.protos.grpc_service_pb2" not in sys.modules


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compat") / "repo"
    onnx_models.affine(root / "affine" / "1" / "model.onnx")
    onnx_models.write_config(root, "affine", "max_batch_size: 8\ndynamic_batching { }\n")
    onnx_models.strings(root / "strings" / "1" / "model.onnx")
    onnx_models.identity_types(root / "half" / "1" / "model.onnx", [10])  # FLOAT16
    onnx_models.not_batching(root / "neg" / "1" / "model.onnx")
    onnx_models.write_config(root, "neg", "max_batch_size: 0\n")
    return root


@pytest.fixture(scope="module")
def url(repo: Path) -> Iterator[str]:
    with server_process(repo, "--model-control-mode", "explicit", "--load-model", "*") as (port, _proc):
        yield f"127.0.0.1:{port}"


@pytest.fixture
def client(url: str) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(url)
    yield c
    c.close()


def affine_inputs(x: np.ndarray) -> list[tc.InferInput]:
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def test_health_and_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("affine") and client.is_model_ready("affine", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "medserve" and "statistics" in meta["extensions"]
    model = client.get_model_metadata("affine", as_json=True)
    assert model["versions"] == ["1"] and model["inputs"][0]["shape"] == ["-1", "4"]
    config = client.get_model_config("affine", as_json=True)["config"]
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config


def test_infer_equals_onnxruntime(client: tc.InferenceServerClient, repo: Path) -> None:
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    result = client.infer("affine", affine_inputs(x), request_id="abc")
    expected = ort.InferenceSession(str(repo / "affine" / "1" / "model.onnx")).run(None, {"x": x})
    np.testing.assert_array_equal(result.as_numpy("y"), expected[0])
    np.testing.assert_array_equal(result.as_numpy("s"), expected[1])
    response = result.get_response(as_json=True)
    assert response["id"] == "abc" and response["model_version"] == "1"
    assert len(response["parameters"]["model_sha256"]["string_param"]) == 64


def test_requested_outputs_bytes_fp16_and_no_batch(client: tc.InferenceServerClient) -> None:
    x = np.ones((1, 4), np.float32)
    result = client.infer("affine", affine_inputs(x), outputs=[tc.InferRequestedOutput("s")])
    assert result.as_numpy("y") is None and result.as_numpy("s").tolist() == [[4.0]]
    text = tc.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"abc"], [b"d"]], dtype=object))
    assert client.infer("strings", [text]).as_numpy("upper").tolist() == [[b"ABC"], [b"D"]]
    half = np.array([[0.5, -2.0]], np.float16)
    h = tc.InferInput("in_0", [1, 2], "FP16")
    h.set_data_from_numpy(half)
    np.testing.assert_array_equal(client.infer("half", [h]).as_numpy("out_0"), half)
    v = tc.InferInput("x", [3], "FP32")
    v.set_data_from_numpy(np.array([1, 2, 3], np.float32))
    assert client.infer("neg", [v]).as_numpy("y").tolist() == [-1, -2, -3]


def test_async_infer_and_stream(client: tc.InferenceServerClient) -> None:
    done: queue.Queue = queue.Queue()
    client.async_infer("affine", affine_inputs(np.zeros((1, 4), np.float32)), lambda result, error: done.put((result, error)))
    result, error = done.get(timeout=30)
    assert error is None and result.as_numpy("y").tolist() == [[1.0] * 4]
    streamed: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: streamed.put((result, error)))
    for i in range(4):
        client.async_stream_infer("affine", affine_inputs(np.full((1, 4), i, np.float32)), request_id=str(i))
    client.async_stream_infer("nope", affine_inputs(np.zeros((1, 4), np.float32)), request_id="bad")
    got = [streamed.get(timeout=30) for _ in range(5)]
    client.stop_stream()
    ok = {r.get_response().id: r.as_numpy("y")[0, 0] for r, e in got if e is None}
    assert ok == {str(i): 2 * i + 1 for i in range(4)}
    assert sum(e is not None for _, e in got) == 1


def test_statistics_and_repository(client: tc.InferenceServerClient) -> None:
    client.infer("affine", affine_inputs(np.ones((2, 4), np.float32)))
    stats = client.get_inference_statistics("affine", as_json=True)["model_stats"][0]
    assert stats["version"] == "1" and int(stats["inference_count"]) >= 2
    assert int(stats["inference_stats"]["success"]["count"]) >= 1
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["affine"]["state"] == "READY"
    client.unload_model("neg")
    assert not client.is_model_ready("neg")
    client.load_model("neg")
    assert client.is_model_ready("neg")


def test_errors_are_statuses(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("missing", affine_inputs(np.ones((1, 4), np.float32)))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.infer("affine", affine_inputs(np.ones((1, 5), np.float32)))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "expected shape [-1, 4]" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_system_shared_memory_status()
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


def test_asyncio_client(url: str) -> None:
    async def run() -> None:
        async with tc_aio.InferenceServerClient(url) as c:
            assert await c.is_server_ready() and await c.is_model_ready("affine")
            assert (await c.get_model_metadata("affine", as_json=True))["name"] == "affine"
            assert (await c.get_model_config("affine", as_json=True))["config"]["name"] == "affine"
            x = np.arange(4, dtype=np.float32).reshape(1, 4)
            inp = tc_aio.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            results = await asyncio.gather(*(c.infer("affine", [inp]) for _ in range(8)))
            assert all(r.as_numpy("y").tolist() == [[1.0, 3.0, 5.0, 7.0]] for r in results)
            assert (await c.get_inference_statistics("affine", as_json=True))["model_stats"]
            assert (await c.get_model_repository_index(as_json=True))["models"]

    asyncio.run(run())


@pytest.mark.skipif(perf_analyzer() is None, reason="perf_analyzer (tritonclient wheel) not installed")
def test_perf_analyzer_runs_against_medserve(url: str, tmp_path: Path) -> None:
    throughputs = run_perf_analyzer("grpc", url, tmp_path)
    assert len(throughputs) == 2 and all(t > 0 for t in throughputs)


def test_tritonclient_sends_notes_as_strings_to_the_text_model() -> None:
    """Unmodified tritonclient against the demo's text encoder: strings in (BYTES), the embedding
    back; a paraphrase is closer than an unrelated note."""

    repo = Path(os.environ["MEDSERVE_COMPAT_TEXT_REPO"])
    notes = np.array([[b"Patient has chest pain."], [b"The patient complains of pain in the chest."],
                      [b"Discharge summary: fractured left wrist, cast applied."]], dtype=object)
    with server_process(repo) as (port, _proc):
        c = tc.InferenceServerClient(f"127.0.0.1:{port}")
        inp = tc.InferInput("text", list(notes.shape), "BYTES")
        inp.set_data_from_numpy(notes)
        embedding = c.infer("notes_minilm", [inp]).as_numpy("embedding")
        c.close()
    assert embedding.shape == (3, 384)
    assert float(embedding[0] @ embedding[1]) > float(embedding[0] @ embedding[2])


def test_explanations_are_ordinary_outputs_and_parameters_to_tritonclient() -> None:
    """Request parameter `explain` through tritonclient's own `parameters`: `attributions` and
    `base_value` come back as outputs, the method as a response parameter, and they add up."""

    repo = Path(os.environ["MEDSERVE_COMPAT_TEXT_REPO"])
    rows = np.random.default_rng(1).normal(0, 0.05, size=(3, 10)).astype(np.float32)
    with server_process(repo) as (port, _proc):
        c = tc.InferenceServerClient(f"127.0.0.1:{port}")
        name = c.get_model_metadata("diabetes_linear", as_json=True)["inputs"][0]["name"]
        inp = tc.InferInput(name, list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        result = c.infer("diabetes_linear", [inp], parameters={"explain": True})
        plain = c.infer("diabetes_linear", [inp])
        c.close()
    attributions, base = result.as_numpy("attributions"), result.as_numpy("base_value")
    prediction = result.as_numpy("prediction")
    assert attributions.shape == (3, 1, 10) and base.shape == (3, 1)
    np.testing.assert_allclose(attributions.sum(axis=2) + base, prediction.reshape(3, 1), atol=1e-3)
    parameters = result.get_response(as_json=True)["parameters"]
    assert parameters["explain_method"]["string_param"] in ("shapley_exact", "kernel_shap")
    assert parameters["explain_output"]["string_param"] == "prediction"
    assert plain.as_numpy("attributions") is None  # only when asked
