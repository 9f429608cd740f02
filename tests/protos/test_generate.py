"""protos/generate.py: outputs, relative imports, skipping when current, clear failure."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

import pytest

PROTOS = Path(__file__).resolve().parents[2] / "protos"


def _load_generator() -> ModuleType:
    # Loaded by file path, exactly as setup.py does (it must not need the installed package).
    spec = importlib.util.spec_from_file_location("_protogen_under_test", PROTOS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def proto_dir(tmp_path: Path) -> Path:
    for name in ("grpc_service.proto", "model_config.proto"):
        shutil.copy(PROTOS / name, tmp_path / name)
    return tmp_path


def test_generates_modules_and_stubs_with_relative_imports(proto_dir: Path) -> None:
    generator = _load_generator()
    generator.generate(proto_dir)
    for name in generator.OUTPUTS:
        assert (proto_dir / name).is_file(), name
    assert not list(proto_dir.glob(".protoc-*")), "temporary directory left behind"
    service = (proto_dir / "grpc_service_pb2.py").read_text()
    assert "from . import model_config_pb2 as" in service
    assert "from . import grpc_service_pb2 as" in (proto_dir / "grpc_service_pb2_grpc.py").read_text()
    for name in generator.OUTPUTS:
        text = (proto_dir / name).read_text()
        assert "\nimport model_config_pb2" not in text and "\nimport grpc_service_pb2" not in text, name


def test_skips_when_current_and_regenerates_when_a_proto_changes(proto_dir: Path) -> None:
    generator = _load_generator()
    generator.generate(proto_dir)
    output = proto_dir / "grpc_service_pb2.py"
    future = time.time() + 1000  # newer than every input, generate.py included
    for name in generator.OUTPUTS:
        os.utime(proto_dir / name, (future, future))
    generator.generate(proto_dir)
    assert output.stat().st_mtime == future, "regenerated although outputs were current"

    later = future + 1000
    os.utime(proto_dir / "model_config.proto", (later, later))  # a .proto newer than the outputs
    generator.generate(proto_dir)
    assert output.stat().st_mtime != future
    text = output.read_text()
    generator.generate(proto_dir, force=True)  # idempotent: a forced rerun writes the same text
    assert output.read_text() == text


def test_protoc_failure_raises_and_leaves_outputs_alone(proto_dir: Path) -> None:
    generator = _load_generator()
    (proto_dir / "model_config.proto").write_text(
        'syntax = "proto3";\npackage inference;\nmessage Broken {\n'
    )
    with pytest.raises(generator.ProtocError, match="protoc exited with status"):
        generator.generate(proto_dir)
    assert not list(proto_dir.glob("*_pb2*"))
    assert not list(proto_dir.glob(".protoc-*"))


def test_missing_proto_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="grpc_service.proto|model_config.proto"):
        _load_generator().generate(tmp_path)
