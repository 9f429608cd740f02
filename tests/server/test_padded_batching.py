"""Batches that mix lengths: requests of a padded model (config parameter `pad`, naming a mask)
share batches whatever their length; answers equal one-at-a-time answers; outputs that carry the
padded axis come back at each request's own length; a declaration without a mask is refused."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import from_raw, to_raw
from medserve.server.batching import Batcher, BatcherConfig, BatchRequest
from medserve.server.batching.execute import Padding, concatenate, pad_to
from medserve.server.config import BatchingConfig, PadSpec
from medserve.server.errors import ModelLoadFailed

import onnx_models
from conftest import gated_repository, running_server, wait_for

PAD_CONFIG = """
max_batch_size: 16
dynamic_batching { }
parameters { key: "pad" value: { string_value: "seq:1:0,mask:1:0" } }
parameters { key: "pad_mask" value: { string_value: "mask" } }
"""


def sequence(rows: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, length, 3)).astype(np.float32), np.ones((rows, length), np.int64)


def masked_mean(seq: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (seq * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)


class Recorder:
    """A plain runner for the masked-mean model, recording each batch's input shape."""

    engine_clock = staticmethod(time.thread_time)

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(30)
        self.shapes.append(inputs["seq"].shape)
        return {"m": masked_mean(inputs["seq"], inputs["mask"]), "h": inputs["seq"] * 2}


@pytest.mark.parametrize("seed", range(40))
def test_a_padded_batch_is_each_member_padded_then_concatenated(seed: int) -> None:
    """The one-allocation assembly equals padding each member with np.pad and concatenating:
    values, pad value, dtype and shape, for any padded axis, rows per member (zero included) and
    trailing dims."""
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(2, 5))
    axis = int(rng.integers(1, ndim))
    dims = [int(d) for d in rng.integers(1, 4, size=ndim)]
    members = []
    for _ in range(int(rng.integers(2, 9))):
        shape = list(dims)
        shape[0], shape[axis] = int(rng.integers(0, 4)), int(rng.integers(0, 30))
        members.append({"seq": rng.integers(-50, 50, size=shape).astype(np.int64),
                        "other": rng.normal(size=(shape[0], 2)).astype(np.float32)})
    padding = Padding({"seq": (axis, -7)}, {}, [m["seq"].shape[axis] for m in members])
    batch = concatenate(members, padding)
    longest = max(m["seq"].shape[axis] for m in members)
    expected = np.concatenate([pad_to(m["seq"], axis, longest, -7) for m in members])
    assert batch["seq"].dtype == expected.dtype and batch["seq"].shape == expected.shape
    np.testing.assert_array_equal(batch["seq"], expected)
    np.testing.assert_array_equal(batch["other"], np.concatenate([m["other"] for m in members]))


def test_padded_members_whose_other_dims_differ_are_refused_not_broadcast() -> None:
    """A member whose dims beside the padded axis differ fails the batch as numpy's concatenate
    would (the signature refuses it first in the server); it is never broadcast into the slot."""
    members = [{"seq": np.ones((1, 4, 3), np.float32)}, {"seq": np.ones((1, 2, 1), np.float32)}]
    with pytest.raises(ValueError):
        concatenate(members, Padding({"seq": (1, 0.0)}, {}, [4, 2]))


async def test_requests_of_different_lengths_share_one_padded_batch() -> None:
    runner = Recorder()
    config = BatcherConfig("'m' version 1", BatchingConfig(max_batch_rows=16), inline_below_s=0.0,
                           padding=(PadSpec("seq", 1, 0.0), PadSpec("mask", 1, 0.0)), padded_outputs=(("h", 1),))
    batcher = Batcher(runner, config, executor=ThreadPoolExecutor(1))
    batcher.start()
    runner.gate.clear()
    first = batcher.submit(BatchRequest(dict(zip(("seq", "mask"), sequence(1, 4, 0), strict=True)), rows=1))
    await asyncio.to_thread(runner.entered.wait, 30)
    data = [sequence(1 + i % 2, length, i) for i, length in enumerate((5, 8, 6, 7))]  # one length bucket: (4, 8]
    futures = [batcher.submit(BatchRequest({"seq": s, "mask": m}, rows=len(s))) for s, m in data]
    runner.gate.set()
    await first
    results = await asyncio.gather(*futures)
    assert runner.shapes == [(1, 4, 3), (6, 8, 3)]  # one batch of all four, padded to 8 steps
    for (seq, mask), out in zip(data, results, strict=True):
        np.testing.assert_allclose(out["m"], masked_mean(seq, mask), rtol=1e-6)
        assert out["h"].shape == seq.shape  # the time axis cut back to the request's own length
        np.testing.assert_array_equal(out["h"], seq * 2)
    stats = batcher.stats()
    assert stats.work_executed > stats.work_requested  # the padding, counted
    await batcher.stop()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    onnx_models.masked_mean(root / "seqmean" / "1" / "model.onnx")
    onnx_models.write_config(root, "seqmean", PAD_CONFIG)
    return root


def seq_request(seq: np.ndarray, mask: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="seqmean")
    for name, datatype, array in (("seq", "FP32", seq), ("mask", "INT64", mask)):
        req.inputs.add(name=name, datatype=datatype, shape=array.shape)
        req.raw_input_contents.append(to_raw(array))
    return req


def outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {o.name: from_raw(raw, o.datatype, o.shape) for o, raw in zip(response.outputs, response.raw_output_contents,
                                                                          strict=True)}


def test_concurrent_requests_of_different_lengths_run_in_shared_batches(repo: Path) -> None:
    gate = threading.Event()
    # A gate blocks the thread that executes: never the event loop (inline execution off).
    with running_server(repo, repository_cls=gated_repository({"seqmean": gate}), inline_below_us=0) as server:
        stub = server.stub()
        alone = {}
        gate.set()
        data = [sequence(1, length, length) for length in (2, 7, 3, 11, 5, 1, 8, 4)]
        for i, (seq, mask) in enumerate(data):  # one at a time: the reference answers
            alone[i] = outputs(stub.ModelInfer(seq_request(seq, mask), timeout=30))
        before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="seqmean")).model_stats[0]
        gate.clear()
        held = stub.ModelInfer.future(seq_request(*sequence(1, 6, 99)), timeout=60)
        batcher = server.server.repository.get("seqmean").batcher
        wait_for(lambda: batcher.stats().in_flight_requests == 1)
        futures = [stub.ModelInfer.future(seq_request(seq, mask), timeout=60) for seq, mask in data]
        wait_for(lambda: batcher.stats().queued == len(data))
        gate.set()
        held.result()
        together = [outputs(f.result()) for f in futures]
        after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="seqmean")).model_stats[0]
    executions = after.execution_count - before.execution_count
    inferences = after.inference_count - before.inference_count
    assert inferences == 9 and executions == 2  # the held one, then all eight in one padded batch
    for i, out in enumerate(together):
        np.testing.assert_allclose(out["m"], alone[i]["m"], rtol=1e-6, atol=1e-6)
        assert out["h"].shape == alone[i]["h"].shape
        np.testing.assert_array_equal(out["h"], alone[i]["h"])


def test_padded_inputs_of_one_request_must_agree_on_their_length(repo: Path) -> None:
    with running_server(repo) as server:
        seq, _ = sequence(1, 4, 0)
        with pytest.raises(grpc.RpcError) as info:
            server.stub().ModelInfer(seq_request(seq, np.ones((1, 5), np.int64)), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the padded inputs disagree on their length" in info.value.details()


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ('parameters { key: "pad" value: { string_value: "seq:1:0" } }', "names no mask input"),
        ('parameters { key: "pad" value: { string_value: "seq:1:0,mask:1:1" } }',
         "the mask input 'mask' must be padded with 0"),
        ('parameters { key: "pad" value: { string_value: "seq:2:0,mask:1:0" } }', "the axis must be a variable dim"),
        ('parameters { key: "pad" value: { string_value: "nope:1:0,mask:1:0" } }', "names 'nope', not an input"),
        ('parameters { key: "pad" value: { string_value: "seq:1" } }', "expected input:axis:value"),
    ],
)
def test_a_padding_declaration_the_graph_cannot_honour_is_refused_at_load(tmp_path: Path, parameters: str,
                                                                          message: str) -> None:
    root = tmp_path / "repo"
    onnx_models.masked_mean(root / "seqmean" / "1" / "model.onnx")
    onnx_models.write_config(root, "seqmean", f"max_batch_size: 16\ndynamic_batching {{ }}\n{parameters}\n")
    with pytest.raises(ModelLoadFailed, match=message), running_server(root):
        pass


def test_the_transformer_demo_answers_the_same_padded_and_alone(tmp_path: Path) -> None:
    """The demo's Transformer encoder over token ids, exported and served with padding on."""
    torch = pytest.importorskip("torch")
    from medserve.exporters import export
    from medserve.exporters.demo_nets import NotesTransformer

    torch.manual_seed(0)
    net = NotesTransformer(vocab=200).eval()
    ids = torch.randint(1, 200, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.int64)
    repo = tmp_path / "repo"
    export(net, {"input_ids": ids, "attention_mask": mask}, repo, "notes",
           dynamic_axes={"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}})
    config = repo / "notes" / "config.pbtxt"
    config.write_text(config.read_text() + 'parameters { key: "pad" value: { string_value: '
                      '"input_ids:1:0,attention_mask:1:0" } }\n')
    gate = threading.Event()
    rng = np.random.default_rng(1)
    notes = [rng.integers(1, 200, size=(1, n)).astype(np.int64) for n in (3, 17, 8, 30, 1, 12)]

    def request(tokens: np.ndarray) -> pb.ModelInferRequest:
        req = pb.ModelInferRequest(model_name="notes")
        for name, array in (("input_ids", tokens), ("attention_mask", np.ones_like(tokens))):
            req.inputs.add(name=name, datatype="INT64", shape=array.shape)
            req.raw_input_contents.append(to_raw(array))
        return req

    with running_server(repo, repository_cls=gated_repository({"notes": gate}), inline_below_us=0) as server:
        stub = server.stub()
        gate.set()
        alone = [outputs(stub.ModelInfer(request(t), timeout=30)) for t in notes]
        gate.clear()
        held = stub.ModelInfer.future(request(notes[0]), timeout=60)
        batcher = server.server.repository.get("notes").batcher
        wait_for(lambda: batcher.stats().in_flight_requests == 1)
        futures = [stub.ModelInfer.future(request(t), timeout=60) for t in notes]
        wait_for(lambda: batcher.stats().queued == len(notes))
        gate.set()
        held.result()
        together = [outputs(f.result()) for f in futures]
        assert batcher.stats().work_executed > batcher.stats().work_requested
    for a, b in zip(alone, together, strict=True):
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-5)
