"""Publication into the repository: version numbering, immutability, atomicity, config.pbtxt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medserve.exporters import ExportError, SignatureMismatchError, VersionExistsError, export, triton_config
from medserve.exporters.publish import publish
from medserve.exporters.specs import TensorSpec

from exporter_helpers import assert_config_matches_graph, breast_cancer, diabetes, read_config, sha256_file


@pytest.fixture(scope="module")
def classifier() -> tuple[Any, np.ndarray]:
    x_train, y_train, _, _ = breast_cancer()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train), x_train[:10]


def _config(name: str) -> Any:
    spec_in = TensorSpec("input", "FP32", (-1, 3))
    spec_out = TensorSpec("output", "FP32", (-1, 1))
    return triton_config.build_config(name, [spec_in], [spec_out], 8)


def test_versions_count_up_from_one(classifier: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    model, sample = classifier
    assert [export(model, sample, tmp_path, "bc").version for _ in range(3)] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "bc").iterdir()) == ["1", "2", "3", "config.pbtxt"]


def test_next_version_follows_the_highest_and_ignores_other_folders(
    classifier: tuple[Any, np.ndarray], tmp_path: Path
) -> None:
    model, sample = classifier
    export(model, sample, tmp_path, "bc", version=4)
    for other in ("notes", ".tmp-abandoned", "0"):
        (tmp_path / "bc" / other).mkdir()
    assert export(model, sample, tmp_path, "bc").version == 5


def test_existing_version_is_never_overwritten(classifier: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    model, sample = classifier
    first = export(model, sample, tmp_path, "bc", version=2, description="first")
    before = (sha256_file(first.model_path), first.card_path.read_bytes())
    other = LinearRegression().fit(sample, np.arange(len(sample)))  # a different graph, same name

    with pytest.raises(VersionExistsError, match="version 2 already exists"):
        export(model, sample, tmp_path, "bc", version=2, description="second")
    with pytest.raises(ExportError):
        export(other, sample, tmp_path, "bc", version=2)

    assert (sha256_file(first.model_path), first.card_path.read_bytes()) == before
    assert sorted(p.name for p in (tmp_path / "bc").iterdir()) == ["2", "config.pbtxt"]


def test_failure_mid_publication_leaves_nothing_behind(tmp_path: Path) -> None:
    """The card factory runs after model.onnx is already written into the temporary folder."""

    def failing_card(version: int, sha256: str) -> dict[str, object]:
        raise RuntimeError("disk full while writing the card")

    with pytest.raises(RuntimeError, match="disk full"):
        publish(tmp_path, "m", version=None, model_bytes=b"graph", make_card=failing_card, config=_config("m"))
    assert list(tmp_path.iterdir()) == []  # not even an empty model folder, which the server would reject

    publish(tmp_path, "m", version=None, model_bytes=b"v1", make_card=lambda v, s: {"v": v}, config=_config("m"))
    config_before = (tmp_path / "m" / "config.pbtxt").read_bytes()
    with pytest.raises(RuntimeError):
        publish(tmp_path, "m", version=None, model_bytes=b"v2", make_card=failing_card, config=_config("m"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "config.pbtxt"]
    assert (tmp_path / "m" / "1" / "model.onnx").read_bytes() == b"v1"
    assert (tmp_path / "m" / "config.pbtxt").read_bytes() == config_before


def test_unserializable_card_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="model card of 'm': x: .*NaN and Infinity are not JSON"):
        publish(
            tmp_path, "m", version=1, model_bytes=b"g", make_card=lambda v, s: {"x": float("nan")}, config=_config("m")
        )
    assert list(tmp_path.iterdir()) == []


def test_other_signature_is_refused_before_writing(classifier: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    model, sample = classifier
    export(model, sample, tmp_path, "risk")
    config_before = (tmp_path / "risk" / "config.pbtxt").read_bytes()
    x_train, y_train, _, _ = diabetes()
    regressor = LinearRegression().fit(x_train, y_train)

    with pytest.raises(SignatureMismatchError) as caught:
        export(regressor, x_train[:10], tmp_path, "risk")

    message = str(caught.value)
    assert "input TYPE_FP32 [30]" in message and "input TYPE_FP32 [10]" in message and "prediction" in message
    assert sorted(p.name for p in (tmp_path / "risk").iterdir()) == ["1", "config.pbtxt"]
    assert (tmp_path / "risk" / "config.pbtxt").read_bytes() == config_before


def test_config_pbtxt_is_triton_model_config(classifier: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    model, sample = classifier
    report = export(model, sample, tmp_path, "bc", max_batch_size=32)

    text = report.config_path.read_text(encoding="utf-8")
    assert "max_queue_delay_microseconds: 0" in text  # deliberate, so spelled out
    config = read_config(report.config_path)
    assert config.name == "bc" and config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
    assert not config.HasField("version_policy")
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [30])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("label", []), ("probabilities", [2])]
    assert_config_matches_graph(tmp_path / "bc")


def test_the_server_accepts_the_published_config(classifier: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    """The server's own config reader and graph check agree with what we wrote."""
    import onnxruntime as ort

    from medserve.server.model_config import complete, from_proto, read_config_proto
    from medserve.server.runtime import GraphTensor

    model, sample = classifier
    report = export(model, sample, tmp_path, "bc")
    session = ort.InferenceSession(str(report.model_path), providers=["CPUExecutionProvider"])

    def tensors(args: list[Any]) -> tuple[GraphTensor, ...]:
        types = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
        return tuple(
            GraphTensor(a.name, types[a.type], tuple(d if isinstance(d, int) else -1 for d in a.shape)) for a in args
        )

    config = from_proto(report.config_path, read_config_proto(report.config_path), "bc")
    completed = complete(report.config_path, config, tensors(session.get_inputs()), tensors(session.get_outputs()))
    # The default max_batch_size is measured for this cheap table: the server reads what was written.
    written = read_config(report.config_path).max_batch_size
    assert completed.max_batch_size == written == report.batching.max_batch_size >= 64
    assert completed.batching is not None
    assert completed.batching.max_queue_delay_us == 0


def test_invalid_names_and_versions_are_refused(classifier: tuple[Any, np.ndarray], tmp_path: Path) -> None:
    model, sample = classifier
    for name in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ExportError, match="model name"):
            export(model, sample, tmp_path, name)
    with pytest.raises(ExportError, match="positive integer"):
        export(model, sample, tmp_path, "bc", version=0)
    assert list(tmp_path.iterdir()) == []
