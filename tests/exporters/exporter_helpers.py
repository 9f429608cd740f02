"""Builders and independent checks shared by the exporter tests (a plain module, imported by name).

The checks here re-derive everything from the published files with plain onnxruntime, onnx and
protobuf calls, so they do not trust the exporter's own parity code or signature reader.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf import text_format
from sklearn.datasets import load_breast_cancer, load_diabetes

from medserve.protos import model_config_pb2 as mc

ONNX_TO_CONFIG: dict[int, int] = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.DOUBLE: mc.TYPE_FP64,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
    onnx.TensorProto.STRING: mc.TYPE_STRING,
    onnx.TensorProto.BOOL: mc.TYPE_BOOL,
}


def breast_cancer(n_train: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def diabetes(n_train: int = 330) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_diabetes(return_X_y=True)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def fit(model: Any, x: Any, y: Any) -> Any:
    """Fit, tolerating only SVC(probability=True)'s scikit-learn 1.9 deprecation notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The `probability` parameter was deprecated", category=FutureWarning)
        return model.fit(x, y)


def run_published(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Answers of a fresh onnxruntime CPU session on the published file."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())


def read_card(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def graph_dims(value: onnx.ValueInfoProto) -> list[int]:
    """Dims of a graph input/output as Triton writes them: -1 for symbolic or unknown."""
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def assert_config_matches_graph(model_dir: Path, version: int = 1) -> None:
    """config.pbtxt lists exactly the graph's inputs/outputs, with its types and non-batch dims;
    a text model (parameter `tokenizer`) declares one `text` string per row instead of the graph's
    inputs, which its `tokenizer_inputs` name in graph order."""
    config = read_config(model_dir / "config.pbtxt")
    graph = onnx.load(str(model_dir / str(version) / "model.onnx")).graph
    assert config.name == model_dir.name
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size > 0
    pairs: list[tuple[Any, Any]] = [(config.output, graph.output)]
    if "tokenizer" in config.parameters:
        assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("text", mc.TYPE_STRING, [1])]
        inputs = config.parameters["tokenizer_inputs"].string_value.split(",")
        assert inputs == [v.name for v in graph.input]
        assert all(graph_dims(v) == [-1, -1] and v.type.tensor_type.elem_type == onnx.TensorProto.INT64 for v in graph.input)
    else:
        pairs.append((config.input, graph.input))
    for declared, values in pairs:
        by_name = {v.name: v for v in values}
        assert sorted(t.name for t in declared) == sorted(by_name)
        for tensor in declared:
            value = by_name[tensor.name]
            dims = graph_dims(value)
            assert dims[0] == -1, f"{tensor.name}: batch dim must be dynamic"
            assert list(tensor.dims) == dims[1:], tensor.name
            assert tensor.data_type == ONNX_TO_CONFIG[value.type.tensor_type.elem_type], tensor.name


def served_answers(repository: Path, name: str, feeds: dict[str, np.ndarray], rows: int = 32) -> dict[str, np.ndarray]:
    """Answers of the real medserve server (real gRPC on a real port) for `feeds`, sent as raw
    contents in requests of at most `rows` rows; BYTES outputs come back as str, as onnxruntime
    gives them."""
    from medserve.protos import grpc_service_pb2 as pb
    from medserve.protos.wire import datatype_of, from_raw, to_raw

    from conftest import running_server

    total = len(next(iter(feeds.values())))
    parts: dict[str, list[np.ndarray]] = {}
    with running_server(repository) as server:
        stub = server.stub()
        for start in range(0, total, rows):
            request = pb.ModelInferRequest(model_name=name)
            for input_name, array in feeds.items():
                chunk = np.ascontiguousarray(array[start : start + rows])
                request.inputs.add(name=input_name, datatype=datatype_of(chunk.dtype), shape=chunk.shape)
                request.raw_input_contents.append(to_raw(chunk))
            response = stub.ModelInfer(request, timeout=60)
            assert len(response.parameters["model_sha256"].string_param) == 64
            for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
                array = from_raw(raw, out.datatype, out.shape)
                if out.datatype == "BYTES":
                    array = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
                parts.setdefault(out.name, []).append(array)
    return {output: np.concatenate(chunks) for output, chunks in parts.items()}


def text_feeds(tokenizer_path: Path, texts: list[str], max_length: int, inputs: list[str], pad_id: int = 0) -> dict[str, np.ndarray]:
    """What a server feeds a text model, built here with the tokenizers library alone: the
    published tokenizer.json truncated at `max_length`, rows padded on the right to the longest."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(max_length)
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    arrays = {
        "input_ids": np.full((len(texts), width), pad_id, np.int64),
        "attention_mask": np.zeros((len(texts), width), np.int64),
        "token_type_ids": np.zeros((len(texts), width), np.int64),
    }
    for row, e in enumerate(encodings):
        arrays["input_ids"][row, : len(e.ids)] = e.ids
        arrays["attention_mask"][row, : len(e.ids)] = 1
        arrays["token_type_ids"][row, : len(e.ids)] = e.type_ids
    return {name: arrays[name] for name in inputs}


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 1.0 - (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def assert_within_recorded_tolerance(report: Any, output: str, actual: np.ndarray, expected: np.ndarray) -> None:
    """`actual` equals `expected` within the tolerance the export recorded for `output`
    (identical where it recorded none, e.g. labels)."""
    (parity,) = [p for p in report.parity if p.output == output]
    if parity.tolerance is None:
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, atol=parity.tolerance.atol, rtol=parity.tolerance.rtol)
