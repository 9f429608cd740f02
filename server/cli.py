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
import signal
import sys
from pathlib import Path

from .config import DEFAULT_MAX_MESSAGE_BYTES, ServerConfig
from .errors import InvalidSetting, MedserveError
from .logs import configure as configure_logging


def _add_serve(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("serve", help="serve a model repository over gRPC (Open Inference Protocol)")
    p.add_argument("--repository", required=True, type=Path, help="model repository folder (Triton layout)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: patient data stays local)")
    p.add_argument("--port", type=int, default=8001, help="port (0 = any free port; see --ready-file)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_BYTES >> 20,
                   help="cap on one gRPC message, MiB (default %(default)s; a larger accepted message stalls the event loop longer)")
    p.add_argument("--max-queue-size", type=int, default=4096, help="cap on queued requests per model version")
    p.add_argument(
        "--intra-op-threads", type=int, default=1,
        help="onnxruntime intra-op threads per session (default 1; 0 = one per core: large CNNs on CPU)",
    )
    p.add_argument("--inter-op-threads", type=int, default=0, help="onnxruntime inter-op threads (0 = its choice)")
    p.add_argument("--providers", default=None, help="comma-separated execution providers (default: best usable)")
    p.add_argument("--drain-grace-s", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    p.add_argument("--drain-announce-s", type=float, default=0.5,
                   help="on shutdown, answer UNAVAILABLE (health NOT_SERVING) this long before draining, so load "
                        "balancers move callers away first")
    p.add_argument(
        "--no-exit-on-error", action="store_true", help="start even if a model fails to load (it stays UNAVAILABLE)"
    )
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates (mutual TLS)")
    p.add_argument("--tokens", default=None,
                   help="identities file (`medserve tokens add`): require a bearer token or a known client "
                        "certificate; SIGHUP re-reads it")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="serve plaintext on a non-loopback --host (only behind a mesh that terminates mTLS)")
    p.add_argument("--model-control-mode", choices=("none", "poll", "explicit"), default="none",
                   help="none: load every model at start, no load/unload RPCs (default); poll: follow the "
                        "repository; explicit: load --load-model models, load/unload by RPC (admin)")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="explicit mode: a model to load at start (repeatable; '*' = all)")
    p.add_argument("--repository-poll-s", type=float, default=15.0, help="poll mode: seconds between scans")
    p.add_argument("--audit-log", default=None, metavar="FILE",
                   help="JSON-lines audit trail of inference, admin and refused calls (HMAC-chained; needs "
                        "--audit-key; with --workers N, worker i writes FILE.w<i>)")
    p.add_argument("--audit-key", default=None, metavar="FILE",
                   help="the audit chain's HMAC key (`medserve audit keygen FILE`); keep a copy for verify")
    p.add_argument("--audit-max-mb", type=int, default=100, help="rotate the audit log past this size")
    p.add_argument("--audit-retention", type=int, default=None,
                   help="rotated audit logs kept, older ones deleted (default: keep all, delete nothing)")
    p.add_argument("--audit-checkpoint-s", type=float, default=60.0,
                   help="log the audit chain's checkpoint (count, head) this often, and on stop")
    p.add_argument("--audit-fsync", action="store_true",
                   help="fsync the audit log after each write (at most every 20 ms): no record lost on a power "
                        "failure (without it, one the OS had not written yet can be)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=4096,
                   help="calls in progress at once (more: RESOURCE_EXHAUSTED)")
    p.add_argument("--max-streams-per-connection", type=int, default=1024, help="HTTP/2 streams per connection")
    p.add_argument("--max-connection-idle-s", type=float, default=900.0, help="close connections idle this long")
    p.add_argument("--max-connection-age-s", type=float, default=3600.0, help="recycle connections this old")
    p.add_argument("--min-ping-interval-s", type=float, default=10.0,
                   help="a client pinging more often is disconnected (keepalive enforcement)")
    p.add_argument("--inline-below-us", type=int, default=100,
                   help="batches measured faster than this run on the event loop, not a worker thread (0 = never)")
    p.add_argument("--max-tensor-elements", type=int, default=1 << 26, help="elements of one input tensor")
    p.add_argument("--max-bytes-elements", type=int, default=1 << 16, help="elements of one BYTES input tensor")
    p.add_argument("--max-bytes-element-size", type=int, default=1 << 20, help="bytes of one BYTES element")
    p.add_argument("--max-text-bytes", type=int, default=8 << 20,
                   help="bytes of text (all BYTES elements) in one request; more is refused before decoding")
    p.add_argument("--max-json-mb", type=float, default=2.0,
                   help="REST: MiB of a request's JSON (parsed holding the GIL); large tensors go as binary data")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="HTTP port for Prometheus /metrics and health probes (worker i: port+i)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the --metrics-port binds (default loopback; not --host: /metrics lists every model)")
    p.add_argument("--metrics-max-connections", type=int, default=256,
                   help="open connections to --metrics-port (past it the oldest is closed)")
    p.add_argument("--metrics-header-timeout-s", type=float, default=10.0,
                   help="an HTTP connection that has not sent a whole request this long after connecting (or "
                        "idles this long after one) is closed")
    p.add_argument("--http-port", type=_http_port, default=None,
                   help="KServe V2 REST port on --host, with the gRPC port's TLS and identities (default 8000; "
                        "with --port 0 any free port; 'off' = no REST)")
    p.add_argument("--ready-file", type=Path, default=None, help="write {port, pid} JSON here once ready (and "
                   "the ports bound with 0: metrics_port, http_port; with --workers, the workers' pids and "
                   "metrics_ports, rewritten when a restarted worker is serving)")
    p.set_defaults(func=_serve, extras=("server",))


def _serve(args: argparse.Namespace) -> int:
    # Until the server (or the supervisor) handles SIGHUP, one would kill it: ignored meanwhile,
    # it loses nothing, since the identities file is read after the handler is in place.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if args.workers < 1:
        return _refuse(f"--workers {args.workers}: expected >= 1")
    try:
        config = _server_config(args)
        _check_port_free(config.host, config.port)  # before any model loads: one line, not a traceback after
        if config.http_port and args.workers == 1:
            _check_port_free(config.host, config.http_port, "--http-port")
        if config.audit_key is not None:
            from .audit import load_key

            load_key(Path(config.audit_key))  # a bad key file: one line here, not one per worker
        if config.tokens_file is not None and not Path(config.tokens_file).is_file():
            # Secure by default: a missing identities file (an unmounted Secret) stops the start
            # rather than serving with no identity at all. `tokens add` still creates the file.
            raise InvalidSetting(f"--tokens {config.tokens_file}: no such file (create it with `medserve tokens "
                                 "add NAME --models ... --file FILE`; in a container, mount the identities Secret)")
    except InvalidSetting as exc:
        return _refuse(str(exc))
    _warn_if_empty(Path(config.repository))
    from . import app, workers

    try:
        if args.workers > 1:
            return workers.run_workers(config, args.workers, ready_file=args.ready_file, log_format=args.log_format)
        asyncio.run(app.run(config, ready_file=args.ready_file))
    except MedserveError as exc:
        logging.getLogger("medserve").error("cannot start: %s", exc)
        return 1
    return 0


def _check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse a port another process holds before any model loads (gRPC would only fail to bind
    after loading every model, with a traceback). Bound as gRPC binds (SO_REUSEADDR, no
    SO_REUSEPORT), so a socket in TIME_WAIT is no conflict and another server's port is."""
    import errno
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidSetting(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            shown = f"[{host.strip('[]')}]" if ":" in host else host
            if exc.errno == errno.EADDRINUSE:
                raise InvalidSetting(f"{shown}:{port} is in use (another server? pick {flag}, or 0 for any "
                                     "free port)") from None
            raise InvalidSetting(f"{shown}:{port}: cannot bind ({exc.strerror})") from None


def _warn_if_empty(repository: Path) -> None:
    """A repository without a single model folder serves nothing: say so rather than report
    "0 model(s) READY" as if that were the intent (poll and explicit modes may fill it later)."""
    try:
        folders = [p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return  # a missing or unreadable repository is the repository's own error to report
    if not folders:
        logging.getLogger("medserve").warning(
            "repository %s holds no model (expected %s/<model>/<version>/model.onnx): serving none", repository,
            repository)


def _refuse(message: str) -> int:
    print(f"medserve serve: {message}", file=sys.stderr)
    return 2


def _http_port(text: str) -> int:
    """--http-port: a port number, or 'off' (-1)."""
    if text == "off":
        return -1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number or 'off', got {text!r}") from None


def _resolve_http_port(args: argparse.Namespace) -> int | None:
    """8000 unless given; any free port when --port is 0 (tests, several servers); None = off."""
    if args.http_port is None:
        return 0 if args.port == 0 else 8000
    return None if args.http_port == -1 else args.http_port


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
        drain_announce_s=args.drain_announce_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        tokens_file=args.tokens,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=_resolve_http_port(args),
        metrics_max_connections=args.metrics_max_connections,
        metrics_header_timeout_s=args.metrics_header_timeout_s,
        allow_plaintext=args.allow_plaintext,
        model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_model),
        repository_poll_s=args.repository_poll_s,
        audit_log=args.audit_log,
        audit_key=args.audit_key,
        audit_checkpoint_s=args.audit_checkpoint_s,
        audit_max_bytes=args.audit_max_mb << 20,
        audit_fsync=args.audit_fsync,
        audit_retention=args.audit_retention,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_streams_per_connection=args.max_streams_per_connection,
        max_connection_idle_s=args.max_connection_idle_s,
        max_connection_age_s=args.max_connection_age_s,
        min_ping_interval_s=args.min_ping_interval_s,
        max_tensor_elements=args.max_tensor_elements,
        inline_below_us=args.inline_below_us,
        max_bytes_elements=args.max_bytes_elements,
        max_bytes_element_size=args.max_bytes_element_size,
        max_text_bytes=args.max_text_bytes,
        max_json_bytes=int(args.max_json_mb * (1 << 20)),
    )


def _add_tokens(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("tokens", help="manage the identities file of --tokens (add, list, revoke)")
    actions = p.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add an identity; prints its new token once")
    add.add_argument("name")
    add.add_argument("--models", action="append", default=[], required=True,
                     help="model names or patterns it may use (comma-separated or repeated; '*' = all)")
    add.add_argument("--admin", action="store_true", help="may load and unload models (explicit mode)")
    add.add_argument("--certificate", default=None, metavar="SUBJECT",
                     help="a mutual-TLS client certificate subject (SAN, else CN) instead of a token")
    add.add_argument("--rate", type=float, default=0.0, help="requests per second (0 = unlimited)")
    add.add_argument("--burst", type=int, default=0, help="bucket size (default: one second's worth)")
    add.add_argument("--file", required=True, type=Path)
    listing = actions.add_parser("list", help="list identities (never a token)")
    listing.add_argument("--file", required=True, type=Path)
    revoke = actions.add_parser("revoke", help="remove an identity (a running server: send SIGHUP)")
    revoke.add_argument("name")
    revoke.add_argument("--file", required=True, type=Path)
    p.set_defaults(func=_tokens, extras=())


def _tokens(args: argparse.Namespace) -> int:
    import json

    from .identities import IdentityFile

    try:
        identities = IdentityFile.load(args.file)
        if args.action == "list":
            print(json.dumps(identities.describe(), indent=1))
            return 0
        if args.action == "add":
            models = [m.strip() for given in args.models for m in given.split(",")]  # `--models rf,lookup`
            token = identities.add(args.name, models, admin=args.admin, certificate=args.certificate,
                                   rate_per_s=args.rate, burst=args.burst)
            identities.save()
            if token is not None:
                print(token)  # shown once: only its SHA-256 is stored
                print(f"identity {args.name!r} added; keep the token above, it is not stored", file=sys.stderr)
            return 0
        identities.revoke(args.name)
        identities.save()
        print(f"identity {args.name!r} revoked; send SIGHUP to running servers", file=sys.stderr)
        return 0
    except InvalidSetting as exc:
        print(f"medserve tokens: {exc}", file=sys.stderr)
        return 2


def _add_audit(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("audit", help="create the audit key; verify an audit log's keyed chain")
    actions = p.add_subparsers(dest="action", required=True)
    keygen = actions.add_parser("keygen", help="write a new HMAC key to FILE (mode 0600; never overwrites)")
    keygen.add_argument("file", type=Path)
    verify = actions.add_parser(
        "verify", help="verify FILE (its rotated predecessors FILE.1 ..., and per-worker FILE.w0, FILE.w1 ...)")
    verify.add_argument("files", type=Path, nargs="+", metavar="FILE")
    verify.add_argument("--key", type=Path, default=None, help="the key file the server wrote with (--audit-key)")
    verify.add_argument("--structure-only", action="store_true",
                        help="without --key: check sequence and links only (an edit whose chain was recomputed "
                             "passes)")
    verify.add_argument("--expect-count", type=int, action="append", default=[], metavar="N",
                        help="a checkpoint's count (from the server's log; one per chain, in order)")
    verify.add_argument("--expect-head", action="append", default=[], metavar="H",
                        help="a checkpoint's head, with --expect-count")
    verify.add_argument("--only-this-file", action="store_true", help="do not read FILE.1, FILE.2, ...")
    p.set_defaults(func=_audit, extras=())


def _audit(args: argparse.Namespace) -> int:
    from . import audit

    def refuse(message: str) -> int:
        print(f"medserve audit: {message}", file=sys.stderr)
        return 2

    if args.action == "keygen":
        try:
            audit.keygen(args.file)
        except InvalidSetting as exc:
            return refuse(str(exc))
        print(f"audit key written to {args.file} (mode 0600): serve with --audit-key {args.file}, and keep a copy "
              "for `medserve audit verify` where the server's users cannot write it", file=sys.stderr)
        return 0
    if args.key is None and not args.structure_only:
        return refuse("verify needs --key FILE (or --structure-only: no MAC checked)")
    try:
        key = audit.load_key(args.key) if args.key is not None else None
    except InvalidSetting as exc:
        return refuse(str(exc))
    paths: list[Path] = []
    for given in args.files:
        for chain in (audit.chains(given) if not args.only_this_file else [given]):
            if chain not in paths:
                paths.append(chain)
    if not paths:
        return refuse(f"{args.files[0]}: no such file")
    if len(args.expect_count) != len(args.expect_head):
        return refuse("--expect-count and --expect-head come in pairs")
    if args.expect_count and len(args.expect_count) != len(paths):
        return refuse(f"{len(args.expect_count)} checkpoint(s) for {len(paths)} chain(s) "
                      f"({', '.join(str(p) for p in paths)}): give one per chain, in that order")
    checkpoints: list[tuple[int, str] | None] = (
        list(zip(args.expect_count, args.expect_head, strict=True)) or [None] * len(paths))
    results = [audit.verify(p, key=key, checkpoint=c, rotated=not args.only_this_file)
               for p, c in zip(paths, checkpoints, strict=True)]
    for r in results:
        print(r.message, file=sys.stdout if r.ok else sys.stderr)
    ok = all(r.ok for r in results)
    if ok and len(results) > 1:
        print(f"{len(results)} chains intact: {sum(r.records for r in results)} records "
              f"({sum(r.calls for r in results)} calls)")
    return 0 if ok else 1


def _add_trial(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("trial", help="silent trials: how a shadow version agrees with the serving one")
    actions = p.add_subparsers(dest="action", required=True)
    report = actions.add_parser("report", help="agreement, differences by decile, rows compared and shed "
                                "(read from the model's ModelMetadata over gRPC)")
    report.add_argument("model")
    report.add_argument("--target", required=True, help="HOST:PORT of the server's gRPC port")
    report.add_argument("--ca", type=Path, help="CA bundle of a TLS server")
    report.add_argument("--token-env", default="MEDSERVE_TOKEN",
                        help="environment variable holding a bearer token (default MEDSERVE_TOKEN; never a flag)")
    report.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_trial, extras=())


def _trial(args: argparse.Namespace) -> int:
    import json
    import os

    from medserve.clients import Client, MedserveClientError, TLSConfig

    from .rollout import format_report, trial_report

    token = os.environ.get(args.token_env) or None
    tls = TLSConfig(ca_file=args.ca) if args.ca is not None else None
    try:
        with Client(args.target, tls=tls, token=token, allow_insecure_token=tls is None) as client:
            metadata = client.model_metadata(args.model)
    except MedserveClientError as exc:
        print(f"medserve trial report: {exc}", file=sys.stderr)
        return 1
    raw = metadata.parameters.get("trial")
    reports = [trial_report(t) for t in json.loads(raw)] if isinstance(raw, str) else []
    if args.json:
        print(json.dumps({"model": args.model, "trials": reports}))
    else:
        print(format_report(args.model, reports))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medserve", description=__doc__)
    _add_global_options(parser, default=True)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    _add_tokens(subparsers)
    _add_audit(subparsers)
    _add_trial(subparsers)
    # These modules import only the standard library; their handlers import the rest.
    from medserve.exporters.cli import add_subcommands as add_export
    from medserve.perf.cli import add_subcommands as add_perf

    add_export(subparsers)
    add_perf(subparsers)
    for sub in subparsers.choices.values():  # `medserve serve --log-format json` works as well
        _add_global_options(sub, default=False)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, default: bool) -> None:
    """--log-level and --log-format, before the subcommand (with the defaults) or after it
    (SUPPRESS: set only when given there, so they never reset what was given before it)."""
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        default="INFO" if default else argparse.SUPPRESS, help="log level (default INFO)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text" if default else argparse.SUPPRESS,
                        help="text, or one JSON object per line (for log search)")


def missing_extra_message(command: str, extras: tuple[str, ...], missing: str) -> str:
    """The one line a subcommand prints when a module of its extras is not installed."""
    names = ",".join(extras)
    return (
        f"medserve {command}: needs the {names!r} extra{'s' if len(extras) > 1 else ''} (module {missing!r} is "
        f"not installed): pip install 'medserve[{names}]' (from a checkout: pip install -e '.[{names}]')"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
    except ModuleNotFoundError as exc:
        print(missing_extra_message(args.command, ("server",), exc.name or "pythonjsonlogger"), file=sys.stderr)
        return 2
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
