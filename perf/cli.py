"""`medserve perf` / `python -m medserve.perf`: run a load scenario against one or more targets
and write JSON, CSV, PNG and a summary table.

    python -m medserve.perf --target 127.0.0.1:8001 --model rf --concurrency 1,8,64
    python -m medserve.perf --serve models --workers 2 --model rf --mode open --rate 500:4000:+500
    python -m medserve.perf --scenario perf/examples/scenario.toml --compare-h2load

Heavy modules (numpy, grpc, matplotlib) are imported inside the handler, so registering the
subcommand costs `medserve serve` nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", type=Path, help="scenario TOML file (flags below override its top-level keys)")
    g = p.add_argument_group("targets")
    g.add_argument("--target", action="append", default=[], metavar="[NAME=]HOST:PORT",
                   help="a running server (repeat to compare; the first is the baseline)")
    g.add_argument("--pid", action="append", default=[], metavar="[NAME=]PID",
                   help="server pid of a --target, for its CPU and RSS (from /proc, children included)")
    g.add_argument("--repository", default=None, metavar="DIR",
                   help="where the --target servers' model cards are read from (request rows within the "
                        "cards' feature ranges; without it such rows are drawn from [0, 1))")
    g.add_argument("--serve", action="append", default=[], metavar="[NAME=]REPOSITORY",
                   help="start `medserve serve` on this repository for the run (repeat to compare)")
    g.add_argument("--workers", type=int, default=None,
                   help="--workers of the servers started with --serve, or of the --target servers (their "
                        "statistics are per worker process)")
    g.add_argument("--serve-arg", action="append", default=[], help="extra argument for `medserve serve`")
    g.add_argument("--generator", choices=("python", "grpcio", "h2load"), default=None,
                   help="load generator for all targets: python (load processes, raw HTTP/2; default), grpcio "
                        "(load processes, grpc.aio) or h2load")
    g.add_argument("--compare-h2load", action="store_true",
                   help="also drive every target with h2load, interleaved: the generator saturation check")
    g = p.add_argument_group("requests")
    g.add_argument("--model", action="append", default=[], metavar="NAME[:VER][,batch=N][,weight=W]...",
                   help="model of the mix (repeat for a mix); options: batch, weight, deadline_ms, priority, "
                        "data=card|random|zeros")
    g.add_argument("--shape", action="append", default=[], metavar="INPUT=D1,D2",
                   help="non-batch dims for an input with variable dims (all models)")
    g = p.add_argument_group("load")
    g.add_argument("--mode", choices=("closed", "open"), default=None)
    g.add_argument("--concurrency", default=None, help="closed loop levels: 1,8,64 or 1:256:x2")
    g.add_argument("--rate", default=None, help="open loop levels (req/s): 100,500 or 500:4000:+500")
    g.add_argument("--arrival", choices=("poisson", "fixed"), default=None, help="open loop inter-arrival times")
    for name, kind, text in (
        ("warmup-s", float, "seconds of load before each measurement window"),
        ("measure-s", float, "seconds of each measurement window"),
        ("repetitions", int, "measurements per level and target"),
        ("processes", int, "load processes"),
        ("channels", int, "channels (connections) per load process"),
        ("slo-ms", float, "goodput: OK responses within this latency"),
        ("drain-s", float, "how long to wait for answers after a window"),
        ("max-outstanding", int, "open loop: in-flight cap per load process"),
        ("seed", int, "random seed (data, mix, arrivals)"),
    ):
        g.add_argument(f"--{name}", type=kind, default=None, help=text)
    g = p.add_argument_group("output")
    g.add_argument("--name", default=None, help="scenario name (file stem of the outputs)")
    g.add_argument("--out", type=Path, default=None, help="output folder (default perf/results or ./perf-results)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG (no matplotlib needed)")
    g.add_argument("--quiet", action="store_true", help="no progress line")


def _named(text: str) -> tuple[str | None, str]:
    name, sep, value = text.partition("=")
    return (name, value) if sep else (None, text)


def build_scenario(args: argparse.Namespace) -> Any:
    from .scenario import (
        Scenario,
        ScenarioError,
        ServeSpec,
        Target,
        load_scenario,
        parse_levels,
        parse_model_flag,
    )

    sc = load_scenario(args.scenario) if args.scenario else Scenario()
    top: dict[str, Any] = {}
    for key in ("mode", "arrival", "warmup_s", "measure_s", "repetitions", "processes", "channels", "slo_ms",
                "drain_s", "max_outstanding", "seed", "name"):
        value = getattr(args, key)
        if value is not None:
            top[key] = value
    if args.concurrency and args.rate:
        raise ScenarioError("give --concurrency (closed loop) or --rate (open loop), not both")
    if args.concurrency:
        top["levels"] = parse_levels(args.concurrency)
        top.setdefault("mode", "closed")
    if args.rate:
        top["levels"] = parse_levels(args.rate)
        top.setdefault("mode", "open")
    sc = replace(sc, **top)
    if args.model:
        shapes = {}
        for s in args.shape:
            name, dims = _named(s)
            if name is None:
                raise ScenarioError(f"--shape {s!r}: expected INPUT=D1,D2")
            shapes[name] = tuple(int(d) for d in dims.split(",") if d)
        sc = replace(sc, models=tuple(replace(parse_model_flag(m), shape=shapes) for m in args.model))
    targets = list(sc.targets)
    pids = dict(_named(p) for p in args.pid)
    for i, text in enumerate(args.target):
        name, address = _named(text)
        name = name or address
        pid = pids.get(name) or (pids.get(None) if i == 0 else None)
        targets.append(Target(name=name, address=address, pid=int(pid) if pid else None, workers=args.workers,
                              repository=str(Path(args.repository).resolve()) if args.repository else None))
    for text in args.serve:
        name, repo = _named(text)
        workers = args.workers or 1
        spec = ServeSpec(str(Path(repo).resolve()), workers, tuple(args.serve_arg))
        targets.append(Target(name=name or f"medserve-w{workers}", serve=spec, repository=spec.repository))
    if args.generator:
        targets = [replace(t, generator=args.generator) for t in targets]
    if args.compare_h2load:
        twins = [Target(name=f"{t.name}+h2load", server_of=t.name, generator="h2load", models=t.models,
                        repository=t.repository) for t in targets if t.generator != "h2load"]
        targets += twins
    return replace(sc, targets=tuple(targets)).validate()


def default_out() -> Path:
    return Path("perf/results") if Path("perf").is_dir() else Path("perf-results")


def run_command(args: argparse.Namespace) -> int:
    from . import report
    from .runner import Runner
    from .scenario import ScenarioError

    try:
        scenario = build_scenario(args)
    except ScenarioError as exc:
        print(f"medserve perf: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out or default_out()
    stem = f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runner = Runner(scenario, work_dir=out_dir / f".{stem}-work", progress=None if args.quiet else sys.stderr)
    results = runner.run()
    files = report.write_all(results, out_dir, stem, plots=not args.no_plots)
    print(report.summary_table(results))
    print("\n" + "  ".join(f"{k}: {v}" for k, v in files.items()))
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `medserve perf` on the `medserve` command's subparsers."""
    p = subparsers.add_parser("perf", help="load-test a server: closed/open loop sweeps, latency percentiles",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    p.set_defaults(func=run_command, extras=("perf",))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medserve.perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    return run_command(parser.parse_args(argv))
