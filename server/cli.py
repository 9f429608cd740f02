"""The `medserve` command: `serve`, plus the exporters' `export` / `demo-repository` and the
load harness's `perf`.

Building the parser imports nothing beyond the standard library: each subcommand imports what
it needs inside its handler, so every command works with exactly the extras its README section
installs, and a missing extra is one line naming it (exit 2), never a traceback.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .config import ServerConfig
from .errors import InvalidSetting, MedserveError


def _add_serve(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("serve", help="serve a model repository over gRPC (Open Inference Protocol)")
    p.add_argument("--repository", required=True, type=Path, help="model repository folder (Triton layout)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: patient data stays local)")
    p.add_argument("--port", type=int, default=8001, help="port (0 = any free port; see --ready-file)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--max-message-mb", type=int, default=1024, help="cap on one gRPC message, MiB")
    p.add_argument("--max-queue-size", type=int, default=4096, help="cap on queued requests per model version")
    p.add_argument(
        "--intra-op-threads", type=int, default=1,
        help="onnxruntime intra-op threads per session (default 1; 0 = one per core: large CNNs on CPU)",
    )
    p.add_argument("--inter-op-threads", type=int, default=0, help="onnxruntime inter-op threads (0 = its choice)")
    p.add_argument("--providers", default=None, help="comma-separated execution providers (default: best usable)")
    p.add_argument("--drain-grace-s", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    p.add_argument(
        "--no-exit-on-error", action="store_true", help="start even if a model fails to load (it stays UNAVAILABLE)"
    )
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates (mutual TLS)")
    p.add_argument("--tokens", default=None, help="JSON file token -> [models | '*']: require bearer tokens")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics HTTP port (worker i: port+i)")
    p.add_argument("--ready-file", type=Path, default=None, help="write {port, pid} JSON here once ready")
    p.set_defaults(func=_serve, extras=("server",))


def _serve(args: argparse.Namespace) -> int:
    if args.workers < 1:
        return _refuse(f"--workers {args.workers}: expected >= 1")
    try:
        config = _server_config(args)
    except InvalidSetting as exc:
        return _refuse(str(exc))
    from . import app, workers

    try:
        if args.workers > 1:
            return workers.run_workers(config, args.workers, ready_file=args.ready_file)
        asyncio.run(app.run(config, ready_file=args.ready_file))
    except MedserveError as exc:
        logging.getLogger("medserve").error("cannot start: %s", exc)
        return 1
    return 0


def _refuse(message: str) -> int:
    print(f"medserve serve: {message}", file=sys.stderr)
    return 2


def _server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        repository=str(args.repository),
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_mb << 20,
        max_queue_size=args.max_queue_size,
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=args.inter_op_threads,
        providers=tuple(args.providers.split(",")) if args.providers else None,
        exit_on_error=not args.no_exit_on_error,
        drain_grace_s=args.drain_grace_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        tokens_file=args.tokens,
        metrics_port=args.metrics_port,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    # These modules import only the standard library; their handlers import the rest.
    from medserve.exporters.cli import add_subcommands as add_export
    from medserve.perf.cli import add_subcommands as add_perf

    add_export(subparsers)
    add_perf(subparsers)
    return parser


def missing_extra_message(command: str, extras: tuple[str, ...], missing: str) -> str:
    """The one line a subcommand prints when a module of its extras is not installed."""
    names = ",".join(extras)
    return (
        f"medserve {command}: needs the {names!r} extra{'s' if len(extras) > 1 else ''} (module {missing!r} is "
        f"not installed): pip install 'medserve[{names}]' (from a checkout: pip install -e '.[{names}]')"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "medserve":
            raise  # our own module missing is a broken install, not a missing extra
        print(missing_extra_message(args.command, args.extras, missing), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
