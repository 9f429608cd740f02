"""Results out: the one JSON envelope every benchmark writes (`write_result`), CSV (one row per
configuration and level), a one-screen summary table, the comparison ratios, and PNG plots
(matplotlib, Agg backend, imported here only)."""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark's default output folder

CSV_FIELDS = (
    "config", "generator", "level", "offered_rps", "requests", "throughput_rps", "ok_rps", "goodput_rps",
    "p50_us", "p90_us", "p99_us", "p99.9_us", "max_us", "mean_us", "errors", "statuses", "mean_batch",
    "server_queue_us", "server_infer_us", "server_cpu_cores", "server_rss_mib", "harness_cores",
    "h2load_ok_minus_server", "h2load_disagrees",
)


def write_json(results: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def envelope(schema: str, started_unix: float, **host: Any) -> dict[str, Any]:
    """What every result file starts with: its schema, when it started and how long it took,
    and the host it ran on (`host` adds figures such as the thread hand-off)."""
    return {
        "schema": schema,
        "started_unix": round(started_unix, 3),
        "duration_s": round(time.time() - started_unix, 1),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 **host},
    }


def bench_parser(kind: str, doc: str | None, *, out: bool = True) -> argparse.ArgumentParser:
    """The command line every benchmark starts from: `python -m medserve.perf.<kind>`, its
    docstring as the help, and `--out` (the folder `write_result` writes to)."""
    parser = argparse.ArgumentParser(prog=f"python -m medserve.perf.{kind}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if out:
        parser.add_argument("--out", type=Path, default=None, help="results folder (default perf/results)")
    return parser


def served_model_parser(kind: str, doc: str | None) -> argparse.ArgumentParser:
    """`bench_parser` with what the benchmarks of one served model under h2load take: the model,
    where it is copied from, the levels and the window."""
    parser = bench_parser(kind, doc)
    parser.add_argument("--repository", type=Path, default=None,
                        help="copy the model from here (version 1 alone); default: export it fresh")
    parser.add_argument("--model", default="breast_cancer_rf")
    parser.add_argument("--concurrency", default="64", help="h2load streams, e.g. 1,64")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--measure-s", type=float, default=4.0)
    return parser


def finish_run(kind: str, body: Mapping[str, Any], args: argparse.Namespace, started_unix: float,
               print_report: Any, **host: Any) -> Path:
    """Write a run's JSON (`body` and the command line's arguments) and print its report from
    what was written, so the printed figures are the file's."""
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_result(kind, {**body, "args": arguments}, started_unix=started_unix, out_dir=args.out, **host)
    print_report(json.loads(path.read_text(encoding="utf-8")))
    print(f"results: {path}")
    return path


def write_result(kind: str, body: Mapping[str, Any], *, started_unix: float, out_dir: Path | None = None,
                 path: Path | None = None, **host: Any) -> Path:
    """A benchmark's results as JSON: the envelope (schema `medserve.perf.<kind>/1`), then
    `body`; to `path`, else `<out_dir>/<kind>-<time>.json` (default perf/results)."""
    if path is None:
        path = (out_dir or RESULTS) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return write_json({**envelope(f"medserve.perf.{kind}/1", started_unix, **host), **body}, path)


def _server_figure(level: dict[str, Any], key: str) -> float | None:
    """A server figure over the models of a level (the request-weighted mean)."""
    models = level.get("server_models") or {}
    pairs = [(m.get(key), m.get("success_rps") or 0) for m in models.values() if m.get(key) is not None]
    weight = sum(w for _, w in pairs)
    if not pairs:
        return None
    if weight == 0:
        return pairs[0][0]
    return round(sum(v * w for v, w in pairs) / weight, 2)


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for cfg in results["configs"]:
        for lv in cfg["levels"]:
            lat = lv["latency_us"]
            statuses = lv["statuses"]
            out.append({
                "config": cfg["name"], "generator": cfg["generator"], "level": lv["level"],
                "offered_rps": lv.get("offered_rps"), "requests": lv["requests"],
                "throughput_rps": lv["throughput_rps"], "ok_rps": lv["ok_rps"], "goodput_rps": lv["goodput_rps"],
                "p50_us": lat["p50"], "p90_us": lat["p90"], "p99_us": lat["p99"], "p99.9_us": lat["p99.9"],
                "max_us": lat["max"], "mean_us": lat["mean"],
                "errors": sum(v for k, v in statuses.items() if k != "OK"),
                "statuses": ";".join(f"{k}={v}" for k, v in sorted(statuses.items())),
                "mean_batch": _server_figure(lv, "mean_batch"),
                "server_queue_us": _server_figure(lv, "queue_us"),
                "server_infer_us": _server_figure(lv, "compute_infer_us"),
                "server_cpu_cores": lv.get("server_cpu_cores"), "server_rss_mib": lv.get("server_rss_mib"),
                "harness_cores": lv.get("harness_cores"),
                "h2load_ok_minus_server": (lv.get("h2load_vs_server") or {}).get("difference"),
                "h2load_disagrees": bool((lv.get("h2load_vs_server") or {}).get("disagreeing_repetitions")),
            })
    return out


def write_csv(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows(results):
            w.writerow(r)
    return path


def figure(v: float | None, digits: int = 0) -> str:
    """A number for a printed table; "-" where there is none."""
    return "-" if v is None else f"{v:.{digits}f}"


def _f(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    return figure(None if v is None else v / scale, digits)


def summary_table(results: dict[str, Any]) -> str:
    """One screen: a row per configuration and level, then comparisons and warnings."""
    mode = results["scenario"]["mode"]
    head = (f"{'config':<24} {'c' if mode == 'closed' else 'rate':>6} {'req/s':>8} {'good/s':>8} {'p50':>7} "
            f"{'p90':>7} {'p99':>7} {'p99.9':>7} {'max':>7} {'err':>6} {'batch':>5} {'queue':>7} {'infer':>7} "
            f"{'srvCPU':>6} {'genCPU':>6}")
    lines = [f"latency in ms (OK responses; {'from intended send time' if mode == 'open' else 'closed loop'}), "
             "server queue/infer in µs per request, CPU in cores", head, "-" * len(head)]
    for r in rows(results):
        lines.append(
            f"{r['config'][:24]:<24} {r['level']:>6g} {r['throughput_rps']:>8.0f} {r['goodput_rps']:>8.0f} "
            f"{_f(r['p50_us'], 1e3):>7} {_f(r['p90_us'], 1e3):>7} {_f(r['p99_us'], 1e3):>7} "
            f"{_f(r['p99.9_us'], 1e3):>7} {_f(r['max_us'], 1e3):>7} {r['errors']:>6} {_f(r['mean_batch'], 1, 1):>5} "
            f"{_f(r['server_queue_us'], 1, 0):>7} {_f(r['server_infer_us'], 1, 0):>7} "
            f"{_f(r['server_cpu_cores']):>6} {_f(r['harness_cores']):>6}"
        )
    errs = [r for r in rows(results) if r["errors"]]
    for r in errs:
        lines.append(f"  statuses of {r['config']} @ {r['level']:g}: {r['statuses']}")
    for cfg in results["configs"]:
        for lv in cfg["levels"]:
            check = lv.get("h2load_vs_server")
            if check and check["disagreeing_repetitions"]:
                lines.append(f"  h2load DISAGREES with the server on {cfg['name']} @ {lv['level']:g}: h2load "
                             f"{check['h2load_ok']} OK, server {check['server_success']} OK + "
                             f"{check['server_fail']} failed ({check['difference']:+d}); OK, good/s and err "
                             "are the server's counts")
    if results.get("comparisons"):
        lines.append("")
        lines.append(f"{'compared (other / baseline)':<40} {'level':>6} {'req/s':>7} {'paired':>7} {'p50':>7} "
                     f"{'p99':>7}")
        for c in results["comparisons"]:
            lines.append(f"{(c['other'] + ' / ' + c['baseline'])[:40]:<40} {c['level']:>6g} "
                         f"{_f(c['throughput_ratio'], 1, 3):>7} {_f(c.get('throughput_ratio_paired_median'), 1, 3):>7} "
                         f"{_f(c['p50_ratio'], 1, 3):>7} {_f(c['p99_ratio'], 1, 3):>7}")
    for w in results.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path, dpi: int = 80) -> Path:
    """Three panels: throughput vs level, latency percentiles vs throughput, latency CDF at
    each configuration's highest level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = results["scenario"]["mode"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=dpi)
    ax_t, ax_l, ax_c = axes
    for cfg in results["configs"]:
        lv = cfg["levels"]
        x = [v["level"] for v in lv]
        tput = [v["throughput_rps"] for v in lv]
        line = ax_t.plot(x, tput, marker="o", label=cfg["name"])[0]
        if mode == "open":
            ax_t.plot(x, x, linestyle=":", color="grey")
        color = line.get_color()
        for key, style in (("p50", "-"), ("p99", "--"), ("p99.9", ":")):
            ys = [v["latency_us"][key] / 1e3 if v["latency_us"][key] else None for v in lv]
            pts = [(t, y) for t, y in zip(tput, ys, strict=True) if y is not None]
            if pts:
                ax_l.plot(*zip(*pts, strict=True), linestyle=style, marker=".", color=color,
                          label=f"{cfg['name']} {key}")
        top = lv[-1]
        cdf = top.get("cdf_us") or []
        if cdf:
            ax_c.plot([v / 1e3 for _, v in cdf], [p / 100 for p, _ in cdf], color=color,
                      label=f"{cfg['name']} @ {top['level']:g}")
    ax_t.set_xlabel("concurrency" if mode == "closed" else "offered rate (req/s)")
    ax_t.set_ylabel("throughput (req/s)")
    ax_t.set_xscale("log")
    ax_t.set_title("throughput")
    ax_l.set_xlabel("throughput (req/s)")
    ax_l.set_ylabel("latency (ms)")
    ax_l.set_yscale("log")
    ax_l.set_title("latency p50 / p99 / p99.9")
    ax_c.set_xlabel("latency (ms)")
    ax_c.set_ylabel("fraction of requests")
    ax_c.set_xscale("log")
    ax_c.set_title("latency CDF (highest level)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['scenario']['name']} ({mode} loop, {results['host']['cpus']} cores)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out_dir: Path, stem: str, plots: bool = True) -> dict[str, Path]:
    out = {"json": write_json(results, out_dir / f"{stem}.json"), "csv": write_csv(results, out_dir / f"{stem}.csv")}
    if plots:
        out["png"] = plot(results, out_dir / f"{stem}.png")
    return out
