"""What the serving-time monitor (clinical limits, range flags, drift) costs in throughput.

    python -m medserve.perf.bench_monitor                 # about 4 minutes on 2 cores
    python -m medserve.perf.bench_monitor --repetitions 4 --measure-s 2

In one run:
  1. exports the demo random forest (breast cancer, 30 features) and serves three copies from
     ONE `medserve serve`: `rf_monitored` (the card as exported: training ranges and deciles,
     plus clinical limits on every feature, set wide so that no request is refused),
     `rf_monitored_b` (the same: the A/A control, what two identical models differ by here) and
     `rf_plain` (the card without those tables, so the server builds no monitor; its ranges
     moved to the card's `features` list, which the harness draws request data from and the
     server ignores: every copy gets the same rows). One server, so no copy gains from a
     luckier process placement; then a second server run with the monitored and the plain
     cards swapped between their folders (one copy of a model can read a few per cent faster
     than another for a whole server's life, whatever its card);
  2. one-row requests at a closed-loop concurrency (`--concurrency`, 64: the server saturated,
     where a per-request cost shows most), the three copies interleaved repetition by
     repetition (`--repetitions` x `--measure-s`), the order rotated each time (whichever copy
     goes first in a round reads a few per cent slower on this machine, A/A included);
  3. prints each copy's mean throughput (median p50/p99 and server CPU per request over the
     repetitions), the ratios plain / monitored and A/A (pooled over the
     repetitions, and the median of each repetition's ratio: a slow spell of the machine hits
     both), the server's CPU per request, the monitor's `check()` in process for a one-row and
     an eight-row request, and this machine's thread hand-off.

Target: plain / monitored at most 1.03 (the monitor costs at most 3 % of the throughput); read
it against the A/A ratio, which is the noise of this machine. Writes
perf/results/bench_monitor-<time>.json.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .measure import executor_round_trip_us
from .report import bench_parser, write_result

SOURCE = "breast_cancer_rf"
COPIES = {"monitored": "rf_monitored", "monitored_b": "rf_monitored_b", "plain": "rf_plain"}
# The second server run swaps the cards of two copies: a copy of the same model can read a few
# per cent faster than another for a whole server's life (whatever the card), so each role is
# measured on both.
SWAPPED = {"monitored": "rf_plain", "monitored_b": "rf_monitored_b", "plain": "rf_monitored"}
MONITOR_TABLES = ("feature_limits", "feature_ranges", "feature_deciles")


def _write_card(path: Path, card: dict[str, Any]) -> None:
    from medserve.server.layout import CARD_DIGEST_KEY, card_digest

    card[CARD_DIGEST_KEY] = card_digest(card)
    path.write_text(json.dumps(card, indent=1), encoding="utf-8")


def copies_of(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each copy's card: the monitored ones with clinical limits on every feature (ten times
    wider than the training range: no request is refused), the plain one without the monitor's
    tables but with the same ranges as `features`, which only the load generator reads."""
    ranges = card["feature_ranges"]
    limits = {n: [lo - 10 * (abs(lo) + 1), hi + 10 * (abs(hi) + 1)] for n, (lo, hi) in ranges.items()}
    cards = {}
    for role, name in COPIES.items():
        copy = dict(card, name=name, feature_limits=limits)
        if role == "plain":
            for key in MONITOR_TABLES:
                copy.pop(key)
            copy["features"] = [{"name": n, "min": ranges[n][0], "max": ranges[n][1]} for n in card["feature_names"]]
        cards[role] = copy
    return cards


def build_repository(root: Path) -> dict[str, dict[str, Any]]:
    """The three copies of the demo forest (see the module docstring); returns each role's card."""
    from medserve.exporters.demo import build_demo_repository

    source = root.parent / "source"
    build_demo_repository(source, models=[SOURCE])
    card = json.loads(next((source / SOURCE).glob("*/model_card.json")).read_text(encoding="utf-8"))
    cards = copies_of(card)
    for name in COPIES.values():
        shutil.copytree(source / SOURCE, root / name)
        config = root / name / "config.pbtxt"
        config.write_text(config.read_text(encoding="utf-8").replace(f'name: "{SOURCE}"', f'name: "{name}"', 1),
                          encoding="utf-8")
    place_cards(root, cards, COPIES)
    return cards


def place_cards(root: Path, cards: dict[str, dict[str, Any]], layout: dict[str, str]) -> None:
    """Each role's card into the model folder `layout` gives it."""
    for role, name in layout.items():
        _write_card(next((root / name).glob("*/model_card.json")), cards[role])


def check_us(card: dict[str, Any]) -> dict[str, float]:
    """The monitor's check() in process, µs per request of 1 and of 8 rows (in-range rows)."""
    from medserve.server.monitor import FeatureMonitor

    from .scenario import card_rows

    width = len(card["feature_names"])
    monitor = FeatureMonitor.from_card("rf", card, {"input": (width,)})
    rows = card_rows(card, (8, width), np.float32, np.random.default_rng(0))  # the load generator's rows
    assert monitor is not None and rows is not None
    out = {}
    for count in (1, 8):
        inputs = {monitor.input: rows[:count]}
        best = min(timeit.repeat(partial(monitor.check, inputs), number=5000, repeat=5))
        out[f"rows_{count}"] = round(best / 5000 * 1e6, 2)
    return out


def _sweep(repo: Path, layout: dict[str, str], concurrency: int, warmup_s: float, measure_s: float,
           repetitions: int, work: Path) -> list[dict[str, dict[str, Any]]]:
    """Each repetition measures the three copies in a rotated order (whichever goes first in a
    round reads a few per cent slower here, A/A included): per repetition, each copy's level."""
    from . import serverproc
    from .runner import Runner
    from .scenario import ModelLoad, Scenario, Target

    roles = list(layout)
    reps = []
    with serverproc.medserve(repo, 1, log_dir=work) as srv:
        for rep in range(repetitions):
            order = roles[rep % len(roles):] + roles[:rep % len(roles)]
            targets = tuple(Target(role, srv.address, pid=srv.pid, models=(layout[role],), repository=str(repo))
                            for role in order)
            scenario = Scenario(
                name="bench_monitor", mode="closed", levels=(float(concurrency),), warmup_s=warmup_s,
                measure_s=measure_s, repetitions=1, processes=1, channels=8,
                models=(ModelLoad("model", batch=1, data="card"),), targets=targets,
            )
            print(f"repetition {rep + 1}/{repetitions}: {', '.join(f'{r} ({layout[r]})' for r in order)}",
                  file=sys.stderr)
            results = Runner(scenario, work_dir=work, progress=None).run()
            keep = ("throughput_rps", "server_cpu_cores", "latency_us", "server_models", "statuses")
            reps.append({c["name"]: {k: c["levels"][0].get(k) for k in keep} for c in results["configs"]})
    return reps


def analyse(reps: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    def ratio(a: str, b: str) -> dict[str, float]:
        pooled = sum(r[a]["throughput_rps"] for r in reps) / sum(r[b]["throughput_rps"] for r in reps)
        paired = statistics.median(r[a]["throughput_rps"] / r[b]["throughput_rps"] for r in reps)
        return {"pooled": round(pooled, 3), "paired_median": round(paired, 3)}

    per_copy = {}
    for role in COPIES:
        levels = [r[role] for r in reps]
        rps = statistics.mean(lv["throughput_rps"] for lv in levels)
        cpu = [lv["server_cpu_cores"] / lv["throughput_rps"] * 1e6 for lv in levels if lv.get("server_cpu_cores")]
        per_copy[role] = {"req_s": round(rps), "p50_ms": round(statistics.median(lv["latency_us"]["p50"] for lv in levels) / 1e3, 2),
                          "p99_ms": round(statistics.median(lv["latency_us"]["p99"] for lv in levels) / 1e3, 2),
                          "server_cpu_us_per_request": round(statistics.median(cpu), 1) if cpu else None}
    return {"copies": per_copy, "plain_over_monitored": ratio("plain", "monitored"),
            "a_a": ratio("monitored_b", "monitored")}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench_monitor", __doc__)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--measure-s", type=float, default=3.0)
    parser.add_argument("--repetitions", type=int, default=9,
                        help="measurements per copy and server run (interleaved; two server runs)")
    args = parser.parse_args(argv)
    hand_off = executor_round_trip_us()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="medserve-bench-monitor-") as tmp:
        repo, work = Path(tmp) / "repo", Path(tmp) / "work"
        work.mkdir()
        print("exporting the demo forest ...", file=sys.stderr)
        cards = build_repository(repo)
        check = check_us(cards["monitored"])
        reps = []
        for layout in (COPIES, SWAPPED):
            place_cards(repo, cards, layout)
            reps += _sweep(repo, layout, args.concurrency, args.warmup_s, args.measure_s, args.repetitions, work)
    analysis = analyse(reps)
    print(f"machine: {os.cpu_count()} cores; thread hand-off {hand_off['median_us']} µs median")
    print(f"check() in process: {check['rows_1']} µs (1 row), {check['rows_8']} µs (8 rows)")
    print(f"{'copy':<14}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'server CPU µs/req':>19}")
    for role, row in analysis["copies"].items():
        print(f"{role:<14}{row['req_s']:>8}{row['p50_ms']:>9}{row['p99_ms']:>9}{row['server_cpu_us_per_request']!s:>19}")
    for label, key in (("plain / monitored (target <= 1.03)", "plain_over_monitored"), ("A/A (the noise)", "a_a")):
        r = analysis[key]
        print(f"{label}: pooled {r['pooled']}, median of paired repetitions {r['paired_median']}")
    path = write_result("bench_monitor", {
        "concurrency": args.concurrency, "measure_s": args.measure_s, "repetitions": args.repetitions,
        "check_us": check, **analysis, "repetitions_measured": reps,
    }, started_unix=started, out_dir=args.out, hand_off_us=hand_off)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
