"""Build hook: generate the gRPC/protobuf stubs from protos/*.proto before packaging.

The generated modules are never committed or edited by hand; `pip install .` and
`pip install -e .` both run this (setuptools runs build_py in editable mode too).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_ROOT = Path(__file__).parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("_medserve_protogen", _ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        _load_generator().generate(_ROOT / "protos")
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
