"""Runs a scenario: prepares each target (starts servers it owns, reads model metadata, builds
the request bodies), then for every level and repetition measures each target in turn
(interleaved, so slow drift of a shared machine hits all targets alike), and returns one results
dictionary (see `perf/README.md` for its layout).

Per measurement: the load processes get their jobs and a common start time; warm-up runs
`warmup_s`; the server's ModelStatistics and the CPU of server and harness are read at the start
and the end of the `measure_s` window; requests due in the window are waited for (up to
`drain_s`), so every one of them ends with a status.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import h2load, serverproc
from .loadgen import Job, LoadPool, split_jobs
from .measure import (
    INCOMPLETE,
    StatsProbe,
    host_busy_s,
    latency_summary,
    proc_delta,
    proc_snapshot,
    server_outcomes,
    stats_delta,
    status_name,
)
from .report import envelope
from .scenario import (
    ModelInfo,
    ModelLoad,
    Scenario,
    Target,
    build_payloads,
    fetch_model_info,
    rows_without_card,
)

SCHEMA = "medserve.perf/1"
GENERATOR_SATURATED_CORES = 0.85  # a load process above this share of a core is the bottleneck
HOST_SATURATED_SHARE = 0.9  # server + harness above this share of the host's cores
HOST_OTHER_CORES = 0.1  # CPU used by neither server nor harness above this: not a quiet machine
H2LOAD_MARGIN_S = 0.05  # h2load's logged duration starts this much before the window
# ... and ends this much after it: the window's closing statistics snapshot asks every worker while
# the load goes on (on a busy server the answer waits behind the calls queued there), and calls
# in flight when h2load exits are cancelled, which the server counts as failed: that must happen
# after the snapshot, never during it.
H2LOAD_TAIL_S = 0.5


@dataclass
class PreparedTarget:
    target: Target
    address: str
    pids: list[int]  # server processes to read CPU and RSS from (descendants included)
    workers: int | None
    models: tuple[ModelLoad, ...]
    infos: list[ModelInfo]
    bodies: tuple[tuple[bytes, ...], ...]
    timeouts_s: tuple[float | None, ...]
    plan: bytes
    probe: StatsProbe
    preflight: dict[str, str]
    frame: Path | None = None
    frame_status: tuple[int | None, str] | None = None
    levels: list[dict[str, Any]] = field(default_factory=list)


def _plan(models: tuple[ModelLoad, ...], seed: int, length: int = 4096) -> bytes:
    weights = np.array([m.weight for m in models], dtype=np.float64)
    if len(models) == 1:
        return bytes(1)
    rng = np.random.default_rng(seed)
    return rng.choice(len(models), size=length, p=weights / weights.sum()).astype(np.uint8).tobytes()


def _preflight(address: str, models: tuple[ModelLoad, ...], bodies: tuple[tuple[bytes, ...], ...]) -> dict[str, str]:
    """One request per model before any load: its status is reported, never fatal."""
    import grpc

    from .scenario import INFER_PATH

    out: dict[str, str] = {}
    with grpc.insecure_channel(address) as channel:
        call: Any = channel.unary_unary(INFER_PATH, request_serializer=None, response_deserializer=None)
        for m, label, b in zip(models, model_labels(models), bodies, strict=True):
            try:
                call(b[0], timeout=m.deadline_ms / 1e3 if m.deadline_ms else 30)
                out[label] = "OK"
            except grpc.RpcError as exc:
                out[label] = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return out


class Runner:
    """Runs one scenario. `log` gets human-readable lines; the progress line goes to `progress`
    (a text stream, or None for silence)."""

    def __init__(self, scenario: Scenario, *, work_dir: Path | None = None, progress: Any = sys.stderr,
                 log: Callable[[str], None] | None = None) -> None:
        self.scenario = scenario.validate()
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="medserve-perf-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.warnings: list[str] = []

    # -- preparation ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _targets(self) -> Iterator[list[PreparedTarget]]:
        sc = self.scenario
        with contextlib.ExitStack() as stack:
            prepared: list[PreparedTarget] = []
            for t in sc.targets:
                pids = [t.pid] if t.pid else []
                workers: int | None = t.workers
                address = t.address
                if t.server_of is not None:
                    owner = next(x for x in prepared if x.target.name == t.server_of)
                    address, pids, workers = owner.address, owner.pids, owner.workers
                    t = replace(t, repository=t.repository or owner.target.repository)
                if t.serve is not None:
                    self.log(f"starting medserve serve --repository {t.serve.repository} --workers {t.serve.workers}")
                    handle = stack.enter_context(serverproc.medserve(t.serve.repository, t.serve.workers, t.serve.args,
                                                                     log_dir=self.work_dir))
                    address, pids, workers = handle.address, [handle.pid], t.serve.workers
                assert address is not None
                if pids == [os.getpid()]:
                    self.warnings.append(f"target {t.name!r}: server pid is the harness's own process; "
                                         "its CPU figure includes the harness's parent")
                models = sc.models_for(t)
                infos, bodies = [], []
                for i, m in enumerate(models):
                    info = fetch_model_info(address, m.model, m.version, t.repository)
                    infos.append(info)
                    if t.repository is None and (missing := rows_without_card(info, m)):
                        self.warnings.append(
                            f"target {t.name!r} model {m.model!r}: no model card read for {', '.join(missing)} (give the "
                            "target's repository: --repository, `repository = ...` in the scenario, or --serve); "
                            "values drawn from [0, 1): a model with a feature monitor may flag every request")
                    bodies.append(tuple(build_payloads(info, m, sc.payload_variants, seed=sc.seed + i)))
                probe = StatsProbe(address, workers)
                stack.callback(probe.close)
                body_t = tuple(bodies)
                p = PreparedTarget(
                    target=t, address=address, pids=pids, workers=workers, models=models, infos=infos,
                    bodies=body_t, timeouts_s=tuple(m.deadline_ms / 1e3 if m.deadline_ms else None for m in models),
                    plan=_plan(models, sc.seed), probe=probe, preflight=_preflight(address, models, body_t),
                )
                for name, status in p.preflight.items():
                    if status != "OK":
                        self.log(f"note: target {t.name!r} model {name!r} answers {status} (measured anyway)")
                if t.generator == "h2load":
                    if h2load.find() is None:
                        raise RuntimeError("h2load not found: apt-get install nghttp2-client")
                    p.frame = h2load.write_frame(body_t[0][0], self.work_dir / f"{t.name}-frame.bin".replace("/", "_"))
                    p.frame_status = h2load.check_grpc_status(address, p.frame)
                prepared.append(p)
            yield prepared

    # -- one measurement --------------------------------------------------------------------

    def _show(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write("\r" + text.ljust(110)[:110])
            self.progress.flush()

    def _wait_until(self, t_ns: int, label: str, counter: Callable[[], int] | None) -> None:
        last_t, last_n = time.monotonic_ns(), counter() if counter else 0
        while True:
            now = time.monotonic_ns()
            if now >= t_ns:
                return
            time.sleep(min(0.5, (t_ns - now) / 1e9))
            if counter is not None:
                t, n = time.monotonic_ns(), counter()
                rate = (n - last_n) / max(1e-9, (t - last_t) / 1e9)
                last_t, last_n = t, n
                self._show(f"{label}: {rate:9.0f} req/s, {(t_ns - t) / 1e9:5.1f} s left")
            else:
                self._show(f"{label}: {(t_ns - now) / 1e9:5.1f} s left")

    def _measure_python(self, p: PreparedTarget, pool: LoadPool, level: float, rep: int, label: str) -> dict[str, Any]:
        sc = self.scenario
        closed = sc.mode == "closed"
        shares = split_jobs(int(level) if closed else 0, 0.0 if closed else float(level), pool.size)
        jobs: list[Job | None] = []
        for i, (conc, rate, phase) in enumerate(shares):
            if (closed and conc == 0) or (not closed and rate <= 0):
                jobs.append(None)
                continue
            jobs.append(Job(
                address=p.address, mode=sc.mode, concurrency=conc, rate=rate, arrival=sc.arrival, phase_s=phase,
                warmup_s=sc.warmup_s, measure_s=sc.measure_s, drain_s=sc.drain_s, bodies=p.bodies,
                timeouts_s=p.timeouts_s, goals_ns=self._goals_ns(p), plan=p.plan, channels=sc.channels, max_outstanding=sc.max_outstanding,
                seed=sc.seed * 1000 + rep * 100 + i, generator=p.target.generator,
            ))
        start_ns = pool.start(jobs)
        m0 = start_ns + int(sc.warmup_s * 1e9)
        m1 = m0 + int(sc.measure_s * 1e9)
        self._wait_until(m0, f"{label} warm-up", pool.completed)
        before = self._snapshots(p)
        self._wait_until(m1, f"{label} measuring", pool.completed)
        after = self._snapshots(p)
        self._show(f"{label}: collecting")
        results = pool.collect()
        arrays = {k: np.concatenate([r[k] for r in results]) for k in ("offset_ns", "latency_ns", "lag_ns", "status", "model")}
        harness = {
            "generator": p.target.generator,
            "processes": len(results),
            "load_process_cores": [round(r["cpu_s"] / r["window_s"], 3) for r in results],
            "parent_cores": _cores(before["self"], after["self"]),
            "backlogged": int(sum(r["backlogged"] for r in results)),
        }
        window = {k: sum(r[f"window_{k}"] for r in results) for k in ("done", "ok", "good")}
        return self._result(p, level, arrays, window, before, after, harness)

    def _measure_h2load(self, p: PreparedTarget, level: float, rep: int, label: str) -> dict[str, Any]:
        sc = self.scenario
        assert p.frame is not None
        log_file = self.work_dir / f"h2load-{os.getpid()}-{time.monotonic_ns()}.log"
        # h2load logs its main duration only, timed from its own start: it begins a little
        # early and ends late, so its log covers the window whatever its start-up took and its
        # exit comes after the closing snapshot.
        early = min(sc.warmup_s, H2LOAD_MARGIN_S)
        cmd = h2load.command(p.address, p.frame, int(level), sc.processes * sc.channels, sc.warmup_s - early,
                             sc.measure_s + early + H2LOAD_TAIL_S, log_file)
        start_ns = time.monotonic_ns()
        wall_us = time.time() * 1e6 - start_ns / 1e3  # h2load's log is in wall-clock µs
        run = h2load.H2LoadProcess.start(cmd, log_file)
        m0 = start_ns + int(sc.warmup_s * 1e9)
        m1 = m0 + int(sc.measure_s * 1e9)
        self._wait_until(m0, f"{label} warm-up (h2load)", None)
        before = self._snapshots(p, extra_pids=[run.proc.pid])
        self._wait_until(m1, f"{label} measuring (h2load)", None)
        after = self._snapshots(p, extra_pids=[run.proc.pid])
        summary = run.finish(timeout_s=sc.drain_s + 30)
        log = summary.pop("log")
        log_file.unlink(missing_ok=True)
        status_code, message = p.frame_status or (None, "")
        # h2load sees HTTP only (every HTTP 200 is a success to it); the server's own counts
        # of the window say how many were, the preflight's trailers what the failures were.
        m = p.models[0]
        counted = server_outcomes(before["stats"], after["stats"], m.send_as or m.model, m.version)
        start, end = log["start_us"], log["start_us"] + log["latency_us"]
        status, check = h2load.reconcile(log["http"], end, (before["stats_wall_us"], after["stats_wall_us"]),
                                         status_code, counted)
        w0, w1 = m0 / 1e3 + wall_us, m1 / 1e3 + wall_us
        sel = (start >= w0) & (start < w1)  # the requests of the window: started in it
        n = int(sel.sum())
        arrays = {
            "offset_ns": ((start[sel] - w0) * 1000).astype(np.int64),
            "latency_ns": log["latency_us"][sel] * 1000,
            "lag_ns": np.zeros(n, np.int64),
            "status": status[sel],
            "model": np.zeros(n, np.uint8),
        }
        harness = {
            "generator": "h2load",
            "command": shlex.join(cmd),
            "h2load_cores": _cores(before.get("extra"), after.get("extra")),
            "h2load_summary": summary,
            "grpc_status_check": {"status": status_code, "message": message},
        }
        # Throughput: answers received in the window, as the load processes count them.
        received = (end >= w0) & (end < w1)
        ok_count = check["server_success"] if check["source"] == "server" else int((received & (status == 0)).sum())
        # Goodput: which answers were the OK ones is unknown when some failed, so at most the
        # HTTP-200 answers within the goal.
        within = received & ((log["http"] == 200) if check["latency_mixed"] else (status == 0))
        goal = self._goals_ns(p)[0]
        good = int((within & (log["latency_us"] * 1000 <= goal)).sum()) if goal else ok_count
        window = {"done": int(received.sum()), "ok": ok_count, "good": min(ok_count, good)}
        answered_200 = log["http"][sel] == 200
        res = self._result(p, level, arrays, window, before, after, harness,
                           latency_mask=answered_200 if check["latency_mixed"] else None)
        res["h2load_vs_server"] = check
        where = f"target {p.target.name!r} level {level:g}"
        if status_code is None:
            self.warnings.append(f"target {p.target.name!r}: gRPC status of h2load's requests unverified ({message})")
        if counted is None:
            self.warnings.append(f"{where}: the server keeps no statistics; h2load's HTTP-200 answers are taken "
                                 "as the preflight's status, unverified")
        elif not check["agree"]:
            self.warnings.append(
                f"{where}: h2load counted {check['h2load_ok']} HTTP-200 answers as successes, the server "
                f"{check['server_success']} successes and {check['server_fail']} failures (difference "
                f"{check['difference']:+d}); the successes reported are the server's")
        if check["latency_mixed"]:
            self.warnings.append(f"{where}: latency percentiles are over every HTTP-200 answer, failed ones "
                                 "included (h2load cannot tell them apart)")
        return res

    def _goals_ns(self, p: PreparedTarget) -> tuple[int | None, ...]:
        """Goodput goal per model: the scenario's SLO, else the model's own deadline, else none."""
        goals: list[int | None] = []
        for m in p.models:
            goal_ms = self.scenario.slo_ms or m.deadline_ms
            goals.append(int(goal_ms * 1e6) if goal_ms else None)
        return tuple(goals)

    def _snapshots(self, p: PreparedTarget, extra_pids: list[int] | None = None) -> dict[str, Any]:
        from .measure import descendants

        pids = [q for pid in p.pids for q in descendants(pid)]
        t0 = time.time()
        stats = p.probe.snapshot()
        t1 = time.time()
        return {
            "stats": stats,
            "stats_wall_us": (t0 + t1) / 2 * 1e6,  # when the server read its counters, about
            "server": proc_snapshot(pids) if pids else None,
            "self": proc_snapshot([os.getpid()]),
            "host_busy_s": host_busy_s(),
            "extra": proc_snapshot(extra_pids) if extra_pids else None,
            "at": time.monotonic(),
        }

    def _result(self, p: PreparedTarget, level: float, a: dict[str, np.ndarray], received: dict[str, int],
                before: dict[str, Any], after: dict[str, Any], harness: dict[str, Any],
                latency_mask: np.ndarray | None = None) -> dict[str, Any]:
        """One measurement's record; latency percentiles over the OK requests (or `latency_mask`)."""
        sc = self.scenario
        window = sc.measure_s
        status = a["status"]
        latency = a["latency_ns"]
        codes, counts = np.unique(status, return_counts=True)
        statuses = {status_name(int(c)): int(n) for c, n in zip(codes, counts, strict=True)}
        ok = status == 0 if latency_mask is None else latency_mask
        answered = status != INCOMPLETE
        per_model = {}
        for i, label in enumerate(model_labels(p.models)):
            sel = a["model"] == i
            mc, mn = np.unique(status[sel], return_counts=True)
            per_model[label] = {
                "requests": int(sel.sum()),
                "statuses": {status_name(int(c)): int(n) for c, n in zip(mc, mn, strict=True)},
                "latency_us": latency_summary(latency[sel & ok]),
            }
        server = {"models": stats_delta(before["stats"], after["stats"], window),
                  "process": proc_delta(before["server"], after["server"])}
        wall = after["at"] - before["at"]
        host_cores = round((after["host_busy_s"] - before["host_busy_s"]) / wall, 3) if wall > 0 else None
        result: dict[str, Any] = {
            "level": level,
            "window_s": round(window, 3),
            "requests": int(status.size),
            "statuses": statuses,
            "throughput_rps": round(received["done"] / window, 1),
            "ok_rps": round(received["ok"] / window, 1),
            "goodput_rps": round(received["good"] / window, 1),
            "latency_us": latency_summary(latency[ok]),
            "latency_all_us": latency_summary(latency[answered]),
            "per_model": per_model,
            "server": server,
            "harness": harness,
            "host_busy_cores": host_cores,  # every process of the host; see host_other_cores
        }
        if sc.mode == "open":
            result["offered_rps"] = level
            result["send_lag_us"] = latency_summary(np.maximum(a["lag_ns"], 1000))
        self._check(p, result)
        return result

    def _check(self, p: PreparedTarget, r: dict[str, Any]) -> None:
        name, level = p.target.name, r["level"]
        where = f"target {name!r} level {level:g}"
        h = r["harness"]
        hot = [c for c in h.get("load_process_cores", []) if c >= GENERATOR_SATURATED_CORES]
        if hot:
            self.warnings.append(f"{where}: load process at {max(hot):.2f} cores: the generator, not the server, "
                                 "may be the limit (add --processes, or compare with --compare-h2load)")
        if h.get("backlogged"):
            self.warnings.append(f"{where}: {h['backlogged']} sends waited for max_outstanding; latency still "
                                 "counts from the intended time")
        lag = r.get("send_lag_us", {}).get("p99")
        if lag is not None and lag > 2000:
            self.warnings.append(f"{where}: sends were {lag / 1e3:.1f} ms late at p99 (generator behind schedule; "
                                 "included in the latency)")
        proc = r["server"]["process"]
        harness_cores = sum(h.get("load_process_cores", [])) + (h.get("parent_cores") or 0) + (h.get("h2load_cores") or 0)
        h["total_cores"] = round(harness_cores, 3)
        ncpu = os.cpu_count() or 1
        if proc is not None and r.get("host_busy_cores") is not None:
            # What neither the server nor the harness used: other work on the host, which the
            # server's figures then lack.
            r["host_other_cores"] = other = round(r["host_busy_cores"] - proc["cpu_cores"] - harness_cores, 3)
            if other > HOST_OTHER_CORES:
                self.warnings.append(f"{where}: other processes used {other:.2f} cores of the host during the window: "
                                     "the figures are not from a quiet machine")
        if proc is not None and proc["cpu_cores"] + harness_cores >= HOST_SATURATED_SHARE * ncpu:
            self.warnings.append(
                f"{where}: host CPU saturated (server {proc['cpu_cores']:.2f} + harness {harness_cores:.2f} of "
                f"{ncpu} cores): server and generator compete; throughput is a lower bound")

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        sc = self.scenario
        started = time.time()
        needs_pool = any(t.generator != "h2load" for t in sc.targets)
        with self._targets() as targets, contextlib.ExitStack() as stack:
            pool = stack.enter_context(LoadPool(sc.processes)) if needs_pool else None
            for level in sc.levels:
                for rep in range(sc.repetitions):
                    for p in targets:
                        label = (f"[{p.target.name}] {'c' if sc.mode == 'closed' else 'rate'}={level:g} "
                                 f"rep {rep + 1}/{sc.repetitions}")
                        if p.target.generator == "h2load":
                            r = self._measure_h2load(p, level, rep, label)
                        else:
                            assert pool is not None
                            r = self._measure_python(p, pool, level, rep, label)
                        self._show(f"{label}: {r['throughput_rps']:.0f} req/s, p50 "
                                   f"{_ms(r['latency_us']['p50'])} p99 {_ms(r['latency_us']['p99'])} ms")
                        if self.progress is not None:
                            self.progress.write("\n")
                        p.levels.append(r)
            configs = [self._config_result(p) for p in targets]
        results = {
            **envelope(SCHEMA, started,
                       max_rss_mib_harness=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)),
            "scenario": sc.as_dict(),
            "configs": configs,
            "comparisons": compare(configs),
            "warnings": sorted(set(self.warnings)),
        }
        return results

    def _config_result(self, p: PreparedTarget) -> dict[str, Any]:
        by_level: dict[float, list[dict[str, Any]]] = {}
        for r in p.levels:
            by_level.setdefault(r["level"], []).append(r)
        return {
            "name": p.target.name,
            "address": p.address,
            "generator": p.target.generator,
            "server_workers": p.workers,
            "models": [m.model for m in p.models],
            "preflight": p.preflight,
            "levels": [summarize(level, reps) for level, reps in by_level.items()],
        }


def model_labels(models: tuple[ModelLoad, ...]) -> list[str]:
    """A unique label per entry of the mix: the wire name, with `#i` where it repeats."""
    names = [m.send_as or m.model for m in models]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _cores(before: Any, after: Any) -> float | None:
    d = proc_delta(before, after)
    return None if d is None else d["cpu_cores"]


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1e3:.2f}"


def summarize(level: float, reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One level over its repetitions: throughput as mean (and each value), latency
    percentiles as the median of the repetitions' percentiles, counts summed."""
    def med(path: tuple[str, ...]) -> float | None:
        vals = []
        for r in reps:
            v: Any = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if v is not None:
                vals.append(v)
        return float(np.median(vals)) if vals else None

    statuses: dict[str, int] = {}
    for r in reps:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    tput = [r["throughput_rps"] for r in reps]
    checks = [r["h2load_vs_server"] for r in reps if r.get("h2load_vs_server", {}).get("agree") is not None]
    models = sorted({m for r in reps for m in (r["server"]["models"] or {})})
    server_models = {
        m: {k: med(("server", "models", m, k)) for k in
            ("success_rps", "mean_batch", "queue_us", "compute_infer_us", "request_us")}
        for m in models
    }
    return {
        "level": level,
        "repetitions": reps,
        "requests": sum(r["requests"] for r in reps),
        "statuses": statuses,
        "throughput_rps": round(float(np.mean(tput)), 1),
        "throughput_rps_reps": tput,
        "ok_rps": round(float(np.mean([r["ok_rps"] for r in reps])), 1),
        "goodput_rps": round(float(np.mean([r["goodput_rps"] for r in reps])), 1),
        "latency_us": {k: med(("latency_us", k)) for k in ("p50", "p90", "p99", "p99.9", "max", "mean")},
        "cdf_us": reps[len(reps) // 2]["latency_us"]["cdf"],
        "server_models": server_models,
        "server_cpu_cores": med(("server", "process", "cpu_cores")),
        "server_rss_mib": med(("server", "process", "rss_mib")),
        "harness_cores": med(("harness", "total_cores")),
        "offered_rps": reps[0].get("offered_rps"),
        "send_lag_p99_us": med(("send_lag_us", "p99")),
        # h2load's successes against the server's, summed over the repetitions (None: not h2load,
        # or a server without statistics).
        "h2load_vs_server": {
            "h2load_ok": sum(c["h2load_ok"] for c in checks),
            "server_success": sum(c["server_success"] for c in checks),
            "server_fail": sum(c["server_fail"] for c in checks),
            "difference": sum(c["difference"] for c in checks),
            "disagreeing_repetitions": sum(not c["agree"] for c in checks),
        } if checks else None,
    }


def compare(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each other configuration against the first, level by level: throughput and latency
    ratios (other / baseline), and the median of the per-repetition throughput ratios."""
    if len(configs) < 2:
        return []
    base = configs[0]
    out = []
    for other in configs[1:]:
        for lb in base["levels"]:
            lo = next((x for x in other["levels"] if x["level"] == lb["level"]), None)
            if lo is None:
                continue

            def ratio(a: float | None, b: float | None) -> float | None:
                return round(a / b, 3) if a is not None and b else None

            # Repetitions were interleaved, so rep i of both ran back to back: the median of the
            # paired ratios resists drift of a shared machine better than the ratio of means.
            paired = [ratio(o, b) for o, b in zip(lo["throughput_rps_reps"], lb["throughput_rps_reps"], strict=False)]
            paired_ok = [x for x in paired if x is not None]
            out.append({
                "level": lb["level"], "baseline": base["name"], "other": other["name"],
                "throughput_ratio": ratio(lo["throughput_rps"], lb["throughput_rps"]),
                "throughput_ratio_paired_median": round(float(np.median(paired_ok)), 3) if paired_ok else None,
                "throughput_ratio_reps": paired,
                "goodput_ratio": ratio(lo["goodput_rps"], lb["goodput_rps"]),
                "p50_ratio": ratio(lo["latency_us"]["p50"], lb["latency_us"]["p50"]),
                "p99_ratio": ratio(lo["latency_us"]["p99"], lb["latency_us"]["p99"]),
            })
    return out
