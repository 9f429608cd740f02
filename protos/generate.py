"""Generate the protobuf/gRPC modules and their typed stubs from ``protos/*.proto``.

Called by ``setup.py``'s build_py (loaded by file path, so this module imports nothing from
medserve) and runnable by hand: ``python protos/generate.py [--force] [PROTO_DIR]``.

protoc writes top-level imports (``import model_config_pb2 as ...``) because it knows nothing of
our package layout; we rewrite them into package-relative imports so the modules load as
``medserve.protos.grpc_service_pb2``. Outputs are produced in a temporary directory and moved into
place only when protoc succeeded, so a failed run never leaves half-written modules behind.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

PROTOS = ("model_config.proto", "grpc_service.proto")
OUTPUTS = (
    "model_config_pb2.py",
    "model_config_pb2.pyi",
    "grpc_service_pb2.py",
    "grpc_service_pb2.pyi",
    "grpc_service_pb2_grpc.py",
    "grpc_service_pb2_grpc.pyi",
)
_MODULES = "|".join(re.escape(Path(p).stem + "_pb2") for p in PROTOS)
# `import model_config_pb2 as model__config__pb2` / `import grpc_service_pb2` (as in .pyi files).
_ABSOLUTE_IMPORT = re.compile(rf"^import ({_MODULES})\b", re.MULTILINE)


class ProtocError(RuntimeError):
    """protoc (or one of its plugins) failed; its own diagnostics are on stderr."""


def _plugin(name: str) -> str:
    """Locate a protoc plugin executable: PATH first, then beside the running interpreter.

    The second place matters for builds whose scripts directory is not on PATH.
    """
    candidates = [shutil.which(name)]
    for directory in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidates.append(shutil.which(name, path=str(directory)))
    for found in candidates:
        if found:
            return found
    raise ProtocError(f"protoc plugin {name!r} not found on PATH; install mypy-protobuf")


def _is_up_to_date(proto_dir: Path) -> bool:
    outputs = [proto_dir / name for name in OUTPUTS]
    if not all(path.exists() for path in outputs):
        return False
    inputs = [proto_dir / name for name in PROTOS] + [Path(__file__)]
    newest_input = max(path.stat().st_mtime for path in inputs)
    return min(path.stat().st_mtime for path in outputs) >= newest_input


def _relativize_imports(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    fixed = _ABSOLUTE_IMPORT.sub(r"from . import \1", text)
    if fixed != text:
        path.write_text(fixed, encoding="utf-8")


def generate(proto_dir: Path, *, force: bool = False) -> None:
    """Generate the modules and ``.pyi`` stubs into ``proto_dir`` unless they are already current.

    Raises FileNotFoundError if a .proto is missing and ProtocError if protoc fails.
    """
    from grpc_tools import protoc  # build-time dependency only; keep the import local

    proto_dir = Path(proto_dir).resolve()
    for name in PROTOS:
        if not (proto_dir / name).is_file():
            raise FileNotFoundError(f"missing {proto_dir / name}")
    if not force and _is_up_to_date(proto_dir):
        return

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    # Temporary directory beside the outputs so the final os.replace stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".protoc-", dir=proto_dir) as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--proto_path={well_known}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *(str(proto_dir / name) for name in PROTOS),
        ]
        status = protoc.main(args)
        if status != 0:
            raise ProtocError(f"protoc exited with status {status} for {', '.join(PROTOS)} in {proto_dir}")
        for name in OUTPUTS:
            produced = Path(tmp) / name
            if not produced.is_file():
                raise ProtocError(f"protoc reported success but did not write {name}")
            _relativize_imports(produced)
        # Move only after everything succeeded; os.replace is atomic per file.
        for name in OUTPUTS:
            os.replace(Path(tmp) / name, proto_dir / name)


if __name__ == "__main__":
    cli_args = [arg for arg in sys.argv[1:] if arg != "--force"]
    target = Path(cli_args[0]) if cli_args else Path(__file__).parent
    force = "--force" in sys.argv[1:]
    try:
        if not force and _is_up_to_date(target.resolve()):
            print(f"up to date: {target.resolve()} (use --force to regenerate)")
        else:
            generate(target, force=True)
            print(f"generated {len(OUTPUTS)} files in {target.resolve()}")
    except (ProtocError, FileNotFoundError) as exc:
        sys.exit(f"generate.py: {exc}")
