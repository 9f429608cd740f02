"""Text models under load: padded batching against shape groups, and the server against
onnxruntime in process at the batch sizes it formed.

    python -m medserve.perf.bench_text                    # about 3 minutes on 2 cores
    python -m medserve.perf.bench_text --measure-s 2 --concurrency 1,8 --models notes_transformer

In one run, against one `medserve serve` started here on a fresh demo repository holding only
the text models:
  1. each model in two variants: "padded" (the config as exported: parameters `pad` /
     `pad_mask`, so the batcher pads requests of different lengths to the batch's longest and
     fills the mask with 0) and "shape groups" (a copy named `<model>_shape_groups` without
     those parameters: requests share a batch only when their token counts are equal).
     notes_minilm takes strings (the server's tokenizer stage makes one request's ids and mask,
     then the same `pad` parameter decides whether requests of different lengths may share a
     batch); notes_transformer takes INT64 token ids and the attention mask;
  2. request texts: clinical-style fragments (cut from `exporters.clinical_text`'s sentences)
     whose word counts are log-normal (median 15 words, capped at 120), seeded; the transformer
     gets random ids (within its vocabulary) with the same token counts (all-MiniLM-L6-v2's
     tokenizer applied to the same texts, each model's own maximum length). One request = one row;
  3. a closed loop at each concurrency (`--concurrency`, default 1, 8, 64; one load process
     of the harness's pool, the requests encoded once as `medserve.clients` encodes them) for
     `--measure-s` after `--warmup-s`, the two variants of a
     model interleaved at each level: throughput, p50/p99 latency, the mean batch size the
     server formed (ModelStatistics: Δinference_count / Δexecution_count) and the padding waste
     (the fraction of input elements in executed batches that were padding),
     the server's own engine time per batch (compute_infer; JSON only) and the CPU the server,
     the load process and the rest of the host used in the window;
  4. onnxruntime in process (CPU provider, one intra-op thread, as the server's default) on the
     exported model.onnx at each point's mean batch size (rounded): padded variant = batches
     of lengths drawn from the same distribution, padded to their longest; shape groups = batches
     of one drawn length. For notes_minilm the in-process figure includes tokenization (the
     server's `TokenizerStage`, one text per call as the server runs it, then padding), because
     the server does that work too; the engine-only figure is in the JSON. The ratio printed
     is server throughput / in-process throughput at the same batch size;
  5. the transport's ceiling: the same closed loop, at each level, against `fixed_server`
     answering every request with medserve's real response to the padded variant's first request
     (no handler: what any handler on this transport reaches here). Its ratio to the in-process
     figure says whether a target ratio (0.5, issue 29) is within reach on this machine at all;
  6. the tokenizer stage's cost per request (in process) and this machine's thread hand-off
     (one `loop.run_in_executor` round trip), printed beside the figures.
Prints a table and writes perf/results/bench_text-<time>.json.

The padding waste comes from the server's Prometheus metrics (`--metrics-port 0`: the server
binds a free port and reports it in its ready file):
`medserve_input_elements_total` counts the input elements the requests carried and those the
batches ran; the difference is the padding.
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .loadgen import Job, LoadPool
from .measure import (
    StatsProbe,
    descendants,
    host_busy_s,
    metric_totals,
    proc_delta,
    proc_snapshot,
    status_name,
    time_calls,
)
from .report import bench_parser, figure, write_result
from .serverproc import ServerHandle, fixed_server, medserve

MODELS = ("notes_minilm", "notes_transformer")
SHAPE_GROUPS = "_shape_groups"  # suffix of the copy without `pad` / `pad_mask`
VARIANTS = ("padded", "shape groups")
MEDIAN_WORDS = 15
WORDS_SIGMA = 0.7  # log-normal spread: p90 ~ 37 words, p99 ~ 75
MAX_WORDS = 120
TARGET_RATIO = 0.5  # issue 29: the Transformer at c=64, req/s over onnxruntime in process at the same batches


@dataclass(frozen=True, slots=True)
class TextLoad:
    """The request pool: texts, their word counts and their untruncated token counts."""

    texts: tuple[str, ...]
    words: np.ndarray
    tokens: np.ndarray


@dataclass(frozen=True, slots=True)
class Served:
    """One model variant as the benchmark drives it."""

    model: str  # the demo model it comes from
    variant: str
    name: str  # the name it is served under
    requests: tuple[dict[str, np.ndarray], ...]  # one-row requests, cycled
    bodies: tuple[bytes, ...] = ()  # the same, serialized as ModelInferRequests for `name`

    @classmethod
    def of(cls, model: str, variant: str, name: str, requests: Sequence[dict[str, np.ndarray]]) -> Served:
        from medserve.clients._codec import encode_infer_request

        return cls(model, variant, name, tuple(requests),
                   tuple(encode_infer_request(name, r).SerializeToString() for r in requests))


# -- requests -------------------------------------------------------------------------------


def make_texts(n: int, seed: int, max_words: int = MAX_WORDS) -> TextLoad:
    """`n` clinical-style fragments: consecutive sentences of the clinical text corpus from a
    random start, cut at a log-normal word count (median MEDIAN_WORDS, at most `max_words`)."""
    from tokenizers import Tokenizer

    from medserve.exporters import clinical_text
    from medserve.exporters.pretrained import minilm_l6_v2

    rng = np.random.default_rng([seed, 7])
    # the last parity text is a ~1,000-word record: the length tail comes from the word counts instead
    sentences = [s.split() for s in (*clinical_text.PARITY_SENTENCES[:-1], *clinical_text.triage_notes(seed).texts_train)]
    words = np.clip(np.rint(rng.lognormal(np.log(MEDIAN_WORDS), WORDS_SIGMA, n)), 1, max_words).astype(np.int64)
    texts = []
    for count in words.tolist():
        i = int(rng.integers(len(sentences)))
        picked: list[str] = []
        while len(picked) < count:
            picked += sentences[i % len(sentences)]
            i += 1
        texts.append(" ".join(picked[:count]))
    tokenizer = Tokenizer.from_file(str(minilm_l6_v2() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokens = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)], np.int64)
    return TextLoad(tuple(texts), words, tokens)


def _token_ids(lengths: np.ndarray, vocab: int, seed: int) -> list[dict[str, np.ndarray]]:
    """One-row id/mask requests of the given lengths; ids in 1..vocab-1 (0 is the padding id)."""
    rng = np.random.default_rng([seed, 8])
    return [{"input_ids": rng.integers(1, vocab, size=(1, int(n)), dtype=np.int64),
             "attention_mask": np.ones((1, int(n)), np.int64)} for n in lengths]


def _transformer_limits() -> tuple[int, int]:
    """notes_transformer's vocabulary and position table size (its longest input)."""
    from medserve.exporters.demo_data import NOTES_VOCAB
    from medserve.exporters.demo_nets import NotesTransformer

    return NOTES_VOCAB, int(inspect.signature(NotesTransformer).parameters["max_length"].default)


# -- repository -----------------------------------------------------------------------------


def add_shape_group_copy(repo: Path, model: str) -> str:
    """Copy `model`'s folder as `<model>_shape_groups` with `pad` / `pad_mask` removed from its
    config (so only requests of equal lengths share a batch); returns the copy's name."""
    from google.protobuf import text_format

    from medserve.server.model_config import read_config_proto

    name = model + SHAPE_GROUPS
    shutil.copytree(repo / model, repo / name)
    proto = read_config_proto(repo / name / "config.pbtxt")
    if "pad" not in proto.parameters:
        raise ValueError(f"{model}: its config declares no `pad` parameter; there is no padded variant to compare")
    for key in ("pad", "pad_mask"):
        if key in proto.parameters:
            del proto.parameters[key]
    proto.name = name
    (repo / name / "config.pbtxt").write_text(
        f"# {model} without padded batching (bench_text's shape-group variant)\n" + text_format.MessageToString(proto))
    return name


def _server_config(repo: Path, name: str) -> Any:
    """The config as the server parses it (tokenizer settings, padding)."""
    from medserve.server.model_config import from_proto, read_config_proto

    path = repo / name / "config.pbtxt"
    return from_proto(path, read_config_proto(path), name)


# -- load -----------------------------------------------------------------------------------


def _counters(probe: StatsProbe, name: str) -> tuple[int, int, int, int]:
    """Rows, batches, and the batches' engine runs and nanoseconds (compute_infer) the server
    counted for `name`, summed over its versions."""
    stats = probe.snapshot() or {}
    mine = [v for k, v in stats.items() if k == name or k.startswith(name + ":")]
    return (sum(s.get("inference_count", 0) for s in mine), sum(s.get("execution_count", 0) for s in mine),
            sum(s.get("compute_infer_count", 0) for s in mine), sum(s.get("compute_infer_ns", 0) for s in mine))


def _job(address: str, served: Served, concurrency: int, warmup_s: float, measure_s: float) -> Job:
    return Job(address=address, mode="closed", concurrency=concurrency, rate=0.0, arrival="fixed", phase_s=0.0,
               warmup_s=warmup_s, measure_s=measure_s, drain_s=30.0, bodies=(served.bodies,), timeouts_s=(60.0,),
               goals_ns=(None,), plan=bytes(1), channels=1, max_outstanding=concurrency, seed=0)


def transport_ceiling(pool: LoadPool, medserve_address: str, served: Served, levels: Sequence[int],
                      warmup_s: float, measure_s: float, log_dir: Path) -> dict[int, float]:
    """Req/s of `fixed_server` answering every request with medserve's real response to the
    variant's first request, under the same closed loop and requests: what any handler on this
    transport can reach here (per level)."""
    out = {}
    with fixed_server(medserve_address, served.name, log_dir=log_dir, request=served.bodies[0]) as fixed:
        for level in levels:
            print(f"  {served.name} c={level}: the fixed response ...", file=sys.stderr)
            pool.start([_job(fixed.address, served, level, warmup_s, measure_s)])
            (run,) = pool.collect()
            if (run["status"] != 0).any():
                raise RuntimeError(f"the fixed server for {served.name} failed requests at c={level}")
            out[level] = round(run["window_ok"] / measure_s, 1)
    return out


def closed_loop(pool: LoadPool, server: ServerHandle, probe: StatsProbe, served: Served, concurrency: int,
                warmup_s: float, measure_s: float) -> dict[str, Any]:
    """`concurrency` callers back to back (the load process, closed loop) for warmup + measure
    seconds; figures of the measured window."""
    job = _job(server.address, served, concurrency, warmup_s, measure_s)
    pids = descendants(server.pid)

    def snapshot() -> dict[str, Any]:
        return {"stats": _counters(probe, served.name), "elements": input_elements(server.metrics_url, served.name),
                "server": proc_snapshot(pids), "host": host_busy_s(), "t": time.monotonic_ns()}

    start_ns = pool.start([job])
    m0 = start_ns + int(warmup_s * 1e9)
    time.sleep(max(0.0, (m0 - time.monotonic_ns()) / 1e9))
    before = snapshot()
    time.sleep(max(0.0, (m0 + int(measure_s * 1e9) - time.monotonic_ns()) / 1e9))
    after = snapshot()
    (run,) = pool.collect()
    failed = run["status"] != 0
    if failed.any():
        codes = sorted({status_name(int(c)) for c in run["status"][failed]})
        raise RuntimeError(f"{served.name} c={concurrency}: {int(failed.sum())} requests failed ({', '.join(codes)})")
    inferences, executions, engine_runs, engine_ns = (a - b for a, b in zip(after["stats"], before["stats"], strict=True))
    wall_s = (after["t"] - before["t"]) / 1e9
    server_cores = (proc_delta(before["server"], after["server"]) or {}).get("cpu_cores", 0.0)
    client_cores = round(run["cpu_s"] / run["window_s"], 3)
    host_cores = (after["host"] - before["host"]) / wall_s if wall_s > 0 else 0.0
    lat_us = run["latency_ns"].astype(np.float64) / 1e3
    mean_batch = inferences / executions if executions else None
    requested = after["elements"][0] - before["elements"][0]
    executed = after["elements"][1] - before["elements"][1]
    waste = round(1.0 - requested / executed, 4) if executed else None
    return {
        "model": served.model, "variant": served.variant, "served_as": served.name, "concurrency": concurrency,
        "requests": run["window_ok"], "window_s": round(measure_s, 3),
        "throughput_rps": round(run["window_ok"] / measure_s, 1),
        "latency_us": {"p50": round(float(np.percentile(lat_us, 50)), 1) if lat_us.size else None,
                       "p99": round(float(np.percentile(lat_us, 99)), 1) if lat_us.size else None,
                       "mean": round(float(lat_us.mean()), 1) if lat_us.size else None},
        "inferences": inferences, "executions": executions,
        "mean_batch": round(mean_batch, 2) if mean_batch is not None else None,
        "server_engine_us_per_batch": round(engine_ns / engine_runs / 1e3, 1) if engine_runs else None,
        "padding_waste": waste, "input_elements": {"requested": requested, "executed": executed},
        "cpu_cores": {"server": server_cores, "client": client_cores,
                      "rest_of_host": round(max(0.0, host_cores - server_cores - client_cores), 3)},
    }


def input_elements(metrics_url: str, model: str) -> tuple[float, float]:
    """The server's `medserve_input_elements_total` for `model` (version 1): (requested, executed);
    their difference is the padding its batches ran."""
    found = metric_totals([metrics_url], "medserve_input_elements_total", "kind", {"model": model})
    return found.get("requested", 0.0), found.get("executed", 0.0)


def run_load(pool: LoadPool, server: ServerHandle, served: Sequence[Served], levels: Sequence[int],
             warmup_s: float, measure_s: float) -> list[dict[str, Any]]:
    """Every variant at every level, the variants of one model interleaved level by level, from
    one load process of the shared pool (its client CPU is the load process's)."""
    points = []
    probe = StatsProbe(server.address)
    try:
        for model in dict.fromkeys(s.model for s in served):
            for level in levels:
                for s in (s for s in served if s.model == model):
                    print(f"  {s.name} c={level} ...", file=sys.stderr)
                    points.append(closed_loop(pool, server, probe, s, level, warmup_s, measure_s))
    finally:
        probe.close()
    return points


async def served_facts(address: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per served name: its inputs, execution providers and padding parameters, as the server reports them."""
    from medserve.clients import AsyncClient

    out = {}
    async with AsyncClient(address, timeout_s=60) as client:
        for name in names:
            meta = await client.model_metadata(name)
            config = await client.model_config(name)
            out[name] = {"inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
                         "execution_providers": config.parameters.get("execution_providers"),
                         "pad": config.parameters.get("pad")}
    return out


# -- onnxruntime in process -----------------------------------------------------------------


def seconds_per_batch(run: Callable[[int], object], batches: int, seconds: float, largest: int = 0) -> float:
    """Seconds per batch: the largest batch once untimed (the arena grows to it), then every
    batch in turn, round after round, until `seconds` have passed (at least one round)."""
    run(largest)
    done = 0
    t0 = time.perf_counter()
    while done < batches or time.perf_counter() - t0 < seconds:
        run(done % batches)
        done += 1
    return (time.perf_counter() - t0) / done


def _pad(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One-row id/mask arrays as a batch padded (with 0) to the longest row."""
    longest = max(r["input_ids"].shape[1] for r in rows)
    return {name: np.concatenate([np.pad(r[name], ((0, 0), (0, longest - r[name].shape[1]))) for r in rows])
            for name in rows[0]}


def in_process(served: Served, batch: int, texts: TextLoad, seconds: float, seed: int,
               stage: Any | None, session: Any) -> dict[str, Any]:
    """Rows per second of onnxruntime on batches of `batch` rows as the variant's server batches
    look (padded: drawn lengths padded to the longest; shape groups: one drawn length); for a
    text model also with the tokenizer stage run per text, as the server runs it."""
    rng = np.random.default_rng([seed, 9, batch, VARIANTS.index(served.variant)])
    samples = max(8, -(-64 // batch))  # about 64 rows: the long tail of lengths is sampled, not one batch
    picks = [rng.integers(len(served.requests), size=batch) if served.variant == "padded"
             else np.full(batch, rng.integers(len(served.requests))) for _ in range(samples)]
    if stage is None:
        rows = [[served.requests[i] for i in pick] for pick in picks]
    else:
        rows = [[stage(np.array([[texts.texts[i]]], dtype=object)) for i in pick] for pick in picks]
    feeds = [_pad(r) for r in rows]
    largest = int(np.argmax([f["input_ids"].size for f in feeds]))
    engine_s = seconds_per_batch(lambda i: session.run(None, feeds[i]), samples, seconds, largest)
    out: dict[str, Any] = {"batch": batch, "sample_batches": samples,
                           "mean_padded_length": round(float(np.mean([f["input_ids"].shape[1] for f in feeds])), 1),
                           "engine_us_per_batch": round(engine_s * 1e6, 1), "engine_rows_per_s": round(batch / engine_s, 1)}
    if stage is not None:
        chosen = [np.array([[texts.texts[i]]], dtype=object) for pick in picks for i in pick]

        def tokenize_and_run(i: int) -> object:
            return session.run(None, _pad([stage(t) for t in chosen[i * batch:(i + 1) * batch]]))

        per_batch_s = seconds_per_batch(tokenize_and_run, samples, seconds, largest)
        out["with_tokenization_rows_per_s"] = round(batch / per_batch_s, 1)
    out["rows_per_s"] = out.get("with_tokenization_rows_per_s", out["engine_rows_per_s"])
    out["includes_tokenization"] = stage is not None
    return out


def tokenizer_stage_us(stage: Any, texts: TextLoad, calls: int = 2000) -> dict[str, float]:
    """The tokenizer stage's cost per one-text request (µs), as the server calls it."""
    arrays = [np.array([[t]], dtype=object) for t in texts.texts[:calls]]
    for a in arrays[:100]:
        stage(a)
    each = iter(arrays)
    us = np.asarray(time_calls(lambda: stage(next(each)), calls=len(arrays)), np.float64) / 1e3
    return {"median_us": round(float(np.median(us)), 1), "mean_us": round(float(us.mean()), 1),
            "p99_us": round(float(np.percentile(us, 99)), 1), "calls": len(arrays)}


# -- report ---------------------------------------------------------------------------------


def print_report(result: Mapping[str, Any]) -> None:
    host, dist = result["host"], result["lengths"]
    print(f"machine: {host['cpus']} cores; thread hand-off {host['hand_off_us']['median_us']} µs median "
          f"(one loop.run_in_executor round trip, measured before the load)")
    print(f"requests: {dist['requests']} one-row requests, seed {result['args']['seed']}; words p50/p90/p99/max "
          f"{'/'.join(str(v) for v in dist['words_pct'])}; tokens (all-MiniLM-L6-v2) p50/p90/p99/max "
          f"{'/'.join(str(v) for v in dist['tokens_pct'])}")
    for model, m in result["models"].items():
        extra = f"; tokenizer stage {m['tokenizer_stage_us']['median_us']} µs per request median" \
            if m.get("tokenizer_stage_us") else ""
        print(f"  {model}: truncated at {m['max_length']} tokens ({m['truncated_fraction'] * 100:.1f} % of requests), "
              f"served on {m['execution_providers']}{extra}")
    header = (f"{'model':<18} {'variant':<13} {'c':>3} {'req/s':>8} {'p50 µs':>8} {'p99 µs':>8} {'batch':>6} "
              f"{'pad waste':>10} {'in-proc/s':>10} {'ratio':>6} {'fixed/s':>8} {'f.ratio':>7} "
              f"{'cores srv/cli/rest':>19}")
    print(header)
    print("-" * len(header))
    for p in result["points"]:
        ip = p.get("in_process") or {}
        waste = "-" if p["padding_waste"] is None else f"{p['padding_waste']:.3f}"
        cpu = p["cpu_cores"]
        print(f"{p['model']:<18} {p['variant']:<13} {p['concurrency']:>3} {figure(p['throughput_rps']):>8} "
              f"{figure(p['latency_us']['p50']):>8} {figure(p['latency_us']['p99']):>8} {figure(p['mean_batch'], 2):>6} "
              f"{waste:>10} {figure(ip.get('rows_per_s')):>10} {figure(p.get('ratio_to_in_process'), 2):>6} "
              f"{figure(p.get('fixed_rps')):>8} {figure(p.get('fixed_ratio'), 2):>7} "
              f"{cpu['server']:>6.2f}/{cpu['client']:.2f}/{cpu['rest_of_host']:.2f}")
    print("in-proc/s: onnxruntime in process at the point's mean batch (rounded), rows per second; for notes_minilm "
          "including the tokenizer stage per text (engine only in the JSON). ratio: req/s / in-proc/s.")
    print(f"fixed/s: the same closed loop against a server answering each request with medserve's real response "
          f"(fixed_server: no handler, the transport alone); f.ratio: fixed/s / in-proc/s, the most any handler "
          f"could read here; below {TARGET_RATIO} the target ratio is over the transport's ceiling on this machine.")
    print("pad waste: the fraction of input elements the batches ran that were padding "
          "(the server's medserve_input_elements_total, executed against requested)")
    busy = [p for p in result["points"] if p["cpu_cores"]["rest_of_host"] > 0.2]
    if busy:
        print(f"warning: other processes used > 0.2 cores during {len(busy)} of {len(result['points'])} points")


# -- main -----------------------------------------------------------------------------------


def _levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(v) for v in text.split(",") if v.strip())
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected concurrencies >= 1, got {text!r}")
    return levels


def _models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    if not models or set(models) - set(MODELS):
        raise argparse.ArgumentTypeError(f"expected models among {', '.join(MODELS)}, got {text!r}")
    return models


def main(argv: list[str] | None = None) -> int:
    path, result = run(argv)
    print_report(result)
    print(f"results: {path}  ({result['duration_s']:.0f} s)")
    return 0


def run(argv: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """The benchmark without its printed table: the results file and its contents (bench_rows
    reads the Transformer's ratio from here)."""
    parser = bench_parser("bench_text", __doc__)
    parser.add_argument("--concurrency", type=_levels, default=(1, 8, 64), help="closed-loop callers, e.g. 1,8,64")
    parser.add_argument("--measure-s", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--warmup-s", type=float, default=1.5, help="unmeasured seconds before each point")
    parser.add_argument("--models", type=_models, default=MODELS, help=f"among {','.join(MODELS)}")
    parser.add_argument("--requests", type=int, default=2048, help="distinct requests in the pool (cycled)")
    parser.add_argument("--max-words", type=int, default=MAX_WORDS, help="cap of the word-count distribution")
    parser.add_argument("--in-process-s", type=float, default=0.5, help="seconds of onnxruntime timing per point")
    parser.add_argument("--hand-off-calls", type=int, default=20_000, help="run_in_executor round trips timed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from medserve.exporters.batch_size import server_like_session
    from medserve.exporters.demo import build_demo_repository
    from medserve.server.tokenize import TokenizerStage

    from .measure import executor_round_trip_us

    started = time.time()
    hand_off = executor_round_trip_us(args.hand_off_calls)
    print(f"thread hand-off (one loop.run_in_executor round trip): {hand_off['median_us']} µs median", file=sys.stderr)
    texts = make_texts(args.requests, args.seed, args.max_words)
    # The load process starts now: it imports while the models are built.
    with tempfile.TemporaryDirectory(prefix="medserve-bench-text-") as tmp, LoadPool(1) as pool:
        repo = Path(tmp) / "repo"
        print(f"building {', '.join(args.models)} ...", file=sys.stderr)
        build_demo_repository(repo, models=list(args.models))
        served: list[Served] = []
        models: dict[str, dict[str, Any]] = {}
        stages: dict[str, Any] = {}
        for model in args.models:
            copy = add_shape_group_copy(repo, model)
            config = _server_config(repo, model)
            if config.tokenizer is not None:
                max_length = config.tokenizer.max_length
                pad_id = next((int(p.value) for p in config.padding if p.input == "input_ids"), 0)
                stages[model] = TokenizerStage((repo / model / "1" / config.tokenizer.file).read_text("utf-8"),
                                               config.tokenizer, pad_id)
                requests = [{"text": np.array([[t]], dtype=object)} for t in texts.texts]
            else:
                vocab, max_length = _transformer_limits()
                requests = _token_ids(np.minimum(texts.tokens, max_length), vocab, args.seed)
            models[model] = {"max_length": max_length,
                             "truncated_fraction": round(float(np.mean(texts.tokens > max_length)), 4)}
            for variant, name in zip(VARIANTS, (model, copy), strict=True):
                served.append(Served.of(model, variant, name, requests))
        with medserve(repo, args=("--metrics-port", "0"), log_dir=Path(tmp)) as server:
            facts = asyncio.run(served_facts(server.address, [s.name for s in served]))
            for s in served:
                if (facts[s.name]["pad"] is not None) != (s.variant == "padded"):
                    raise RuntimeError(f"{s.name}: served with pad={facts[s.name]['pad']!r}, expected the {s.variant} variant")
            print(f"closed loop, {args.warmup_s:g} s warm-up + {args.measure_s:g} s per point ...", file=sys.stderr)
            points = run_load(pool, server, served, args.concurrency, args.warmup_s, args.measure_s)
            ceilings = {s.model: transport_ceiling(pool, server.address, s, args.concurrency, args.warmup_s,
                                                   args.measure_s, Path(tmp))
                        for s in served if s.variant == VARIANTS[0]}
        print("onnxruntime in process at the mean batch sizes formed ...", file=sys.stderr)
        by_name = {s.name: s for s in served}
        for model in args.models:
            session = server_like_session((repo / model / "1" / "model.onnx").read_bytes())
            models[model]["execution_providers"] = facts[model]["execution_providers"]
            if model in stages:
                models[model]["tokenizer_stage_us"] = tokenizer_stage_us(stages[model], texts)
            for p in (p for p in points if p["model"] == model):
                batch = max(1, round(p["mean_batch"] or 1))
                p["in_process"] = in_process(by_name[p["served_as"]], batch, texts, args.in_process_s,
                                             args.seed, stages.get(model), session)
                rows_per_s = p["in_process"]["rows_per_s"]
                p["ratio_to_in_process"] = round(p["throughput_rps"] / rows_per_s, 3)
                p["fixed_rps"] = ceilings[model][p["concurrency"]]
                p["fixed_ratio"] = round(p["fixed_rps"] / rows_per_s, 3)
                p["transport_bound"] = p["fixed_ratio"] < TARGET_RATIO
    pct = (50, 90, 99, 100)
    body = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lengths": {"requests": len(texts.texts), "median_words": MEDIAN_WORDS, "words_sigma": WORDS_SIGMA,
                    "words_pct": [int(v) for v in np.percentile(texts.words, pct)],
                    "tokens_pct": [int(v) for v in np.percentile(texts.tokens, pct)]},
        "models": models,
        "served": facts,
        "points": points,
    }
    path = write_result("bench_text", body, started_unix=started, out_dir=args.out, hand_off_us=hand_off)
    return path, json.loads(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    sys.exit(main())
