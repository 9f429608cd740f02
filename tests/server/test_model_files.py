"""Model files an attacker may control: names matched whole, every file real-path checked,
external data only when listed with its SHA-256 in the card, and the hashed bytes are the bytes
onnxruntime runs (a file swapped after publication is refused)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from medserve.server.errors import ModelLoadFailed, ModelNotFound
from medserve.server.layout import is_model_name
from medserve.server.onnx_refs import external_files

import onnx_models
from conftest import running_server


def card(version_dir: Path, **extra: object) -> None:
    sha = hashlib.sha256((version_dir / "model.onnx").read_bytes()).hexdigest()
    (version_dir / "model_card.json").write_text(json.dumps({"model_sha256": sha, **extra}))


def external_model(version_dir: Path, location: str = "weights.bin") -> Path:
    """y = x @ W with W (4 x 4, 64 bytes) stored as external data at `location`."""
    version_dir.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 3, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(version_dir / "model.onnx"), save_as_external_data=True, location=location,
                    size_threshold=0, all_tensors_to_one_file=True)
    return version_dir / "model.onnx"


def load_error(repo: Path) -> str:
    with pytest.raises(ModelLoadFailed) as info, running_server(repo):
        pass
    return str(info.value)


def test_names_are_matched_whole() -> None:
    assert is_model_name("sepsis_v2.1") and not is_model_name("sepsis\n") and not is_model_name(".hidden")
    assert not is_model_name("a/b") and not is_model_name("") and not is_model_name("-x")


def test_a_config_or_card_that_resolves_outside_the_repository_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.pbtxt").write_text("max_batch_size: 8\n")
    (outside / "model_card.json").write_text("{}")
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    (repo / "m" / "config.pbtxt").symlink_to(outside / "config.pbtxt")
    assert load_error(repo).endswith("m/config.pbtxt: the model config resolves outside the model repository")
    (repo / "m" / "config.pbtxt").unlink()
    (repo / "m" / "1" / "model_card.json").symlink_to(outside / "model_card.json")
    assert "m/1/model_card.json: the model card resolves outside the model repository" in load_error(repo)
    (repo / "m" / "1" / "model_card.json").unlink()
    (repo / "n").mkdir()
    (repo / "n" / "1").symlink_to(repo / "m" / "1")  # inside the repository: allowed
    (repo / "o").mkdir()
    (repo / "o" / "1").symlink_to(outside)
    assert "o/1: the version folder resolves outside the model repository" in load_error(repo)


def test_unknown_names_never_touch_the_filesystem(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    onnx_models.affine(repo / "m" / "1" / "model.onnx")
    with running_server(repo) as server:
        for name in ("../m", "m\n", "/etc", ".."):
            with pytest.raises(ModelNotFound):
                server.server.repository.model_dir(name)


def test_external_data_is_found_in_the_model_without_onnx() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = external_model(Path(tmp), "w.bin")
        assert external_files(path.read_bytes()) == {"w.bin"}
    assert external_files(onnx.load(str(onnx_models.affine(Path(tmp) / "a.onnx"))).SerializeToString()) == set()


def test_external_data_loads_only_when_listed_with_its_sha256(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    version = repo / "ext" / "1"
    external_model(version)
    card(version)
    assert "ext/1: external data 'weights.bin' is not listed with its SHA-256 in model_card.json" in load_error(repo)
    digest = hashlib.sha256((version / "weights.bin").read_bytes()).hexdigest()
    card(version, external_data={"weights.bin": "0" * 64})
    assert "its SHA-256 does not match model_card.json" in load_error(repo)
    card(version, external_data={"weights.bin": digest})
    with running_server(repo) as server:
        from medserve.protos import grpc_service_pb2 as pb
        from medserve.protos.wire import from_raw, to_raw

        req = pb.ModelInferRequest(model_name="ext")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(to_raw(np.ones((1, 4), np.float32)))
        response = server.stub().ModelInfer(req, timeout=30)
        assert from_raw(response.raw_output_contents[0], "FP32", [1, 4]).tolist() == [[3.0] * 4]


def test_external_data_outside_the_version_folder_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    version = repo / "ext" / "1"
    (repo / "ext").mkdir(parents=True)
    path = external_model(version, "weights.bin")
    (version / "weights.bin").rename(repo / "ext" / "weights.bin")
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    path.write_bytes(model.SerializeToString())
    digest = hashlib.sha256((repo / "ext" / "weights.bin").read_bytes()).hexdigest()
    card(version, external_data={"../weights.bin": digest})
    assert "external data '../weights.bin' must be a file directly inside the version folder" in load_error(repo)


def test_a_model_file_swapped_after_publication_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    version = repo / "m" / "1"
    onnx_models.affine(version / "model.onnx")
    card(version)
    onnx_models.affine(version / "model.onnx", features=5)  # another graph, same place
    assert "does not match model_card.json model_sha256" in load_error(repo)


def test_listed_files_and_external_data_that_do_not_parse_refuse_the_load(tmp_path: Path) -> None:
    """The card's `files` and `external_data` are typed at load: a SHA-256 that is not one, or a
    list where a map belongs, is refused naming the card's file and the entry (before, a list of
    external data read as "nothing listed", and a bad hash only as a mismatch)."""
    repo = tmp_path / "repo"
    version = onnx_models.affine(repo / "m" / "1" / "model.onnx").parent
    card(version, files={"notes.txt": "not-a-sha"})
    assert "m/1/model_card.json: files['notes.txt']: expected a SHA-256 as 64 lowercase hex digits" in load_error(repo)
    card(version, external_data=["weights.bin"])
    assert "m/1/model_card.json: external_data: expected an object, got an array" in load_error(repo)
