"""The sans-IO core shared by Client and AsyncClient (medserve.clients._calls), driven by hand:
no server, no channel, a fake clock."""
from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np
import pytest

from medserve.clients import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InferRequest,
    InferResult,
    InvalidInputError,
    ModelMetadata,
    RetryPolicy,
    StreamRequestError,
    TensorMetadata,
    Unavailable,
    _calls,
)
from medserve.clients._settings import DEFAULT_MAX_MESSAGE_BYTES, build_settings
from medserve.protos import grpc_service_pb2 as pb


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "boom") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


def _core(
    targets: tuple[str, ...] = ("localhost:1",), retries: RetryPolicy | None = None, timeout_s: float = 10.0
) -> tuple[_calls.Core, FakeTime]:
    settings = build_settings(
        list(targets),
        timeout_s=timeout_s,
        tls=None,
        token=None,
        allow_insecure_token=False,
        retries=retries or RetryPolicy(),
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
    )
    clock = FakeTime()
    return _calls.Core(settings, clock, lambda: 0.0), clock


def _metadata(features: tuple[str, ...] | None, sha: str = "a" * 64) -> ModelMetadata:
    params: dict[str, Any] = {"model_sha256": sha}
    if features is not None:
        params["feature_names"] = json.dumps(list(features))
    n = len(features) if features else -1
    return ModelMetadata("tab", ("1",), "onnx", (TensorMetadata("x", "FP32", (-1, n)),), (), params)


def _result(sha: str | None) -> InferResult:
    return InferResult("tab", "1", "", {"y": np.zeros((1, 1))}, {"model_sha256": sha} if sha else {})


# -- single calls -----------------------------------------------------------------------------------


def test_calls_name_the_method_build_the_request_and_decode() -> None:
    call = _calls.model_ready("m", 3, 1.5)
    assert (call.method, call.timeout_s, call.request_id) == ("ModelReady", 1.5, None)
    assert call.request == pb.ModelReadyRequest(name="m", version="3")
    assert call.decode(pb.ModelReadyResponse(ready=True)) is True
    assert _calls.server_live(None).decode(pb.ServerLiveResponse(live=False)) is False
    assert _calls.model_statistics(None, None, None).request == pb.ModelStatisticsRequest(name="", version="")
    assert _calls.load_model("m", None).request == pb.RepositoryModelLoadRequest(model_name="m")
    assert _calls.unload_model("m", 2.0).decode(object()) is None


def test_infer_call_encodes_before_anything_is_sent() -> None:
    x = np.zeros((2, 3), np.float32)
    call = _calls.infer("m", {"x": x}, version=None, outputs=None, timeout_s=None, request_id="r-1", priority=None)
    assert (call.method, call.request_id, call.request.id) == ("ModelInfer", "r-1", "r-1")
    with pytest.raises(InvalidInputError):
        _calls.infer("m", {"x": object()}, version=None, outputs=None, timeout_s=None, request_id=None, priority=None)


def test_open_channels_uses_the_insecure_constructor_without_credentials() -> None:
    core, _ = _core(("localhost:1", "localhost:2"))
    made = _calls.open_channels(core.settings, lambda *a, **k: ("secure", a[0]), lambda t, **k: ("insecure", t))
    assert made == [("insecure", "localhost:1"), ("insecure", "localhost:2")]


# -- infer_records as a flow ------------------------------------------------------------------------


def _drive(flow: _calls.Flow[Any], answers: list[Any]) -> tuple[list[_calls.Step], Any]:
    steps: list[_calls.Step] = []
    try:
        step = next(flow)
        while True:
            steps.append(step)
            step = flow.send(answers.pop(0))
    except StopIteration as done:
        return steps, done.value


def _records_flow(core: _calls.Core, **kw: Any) -> _calls.Flow[InferResult]:
    args: dict[str, Any] = {"version": None, "outputs": None, "timeout_s": None, "request_id": "r", "priority": None}
    args.update(kw)
    return core.infer_records("tab", [{"b": 2.0, "a": 1.0}], **args)


def test_infer_records_fetches_the_schema_once_then_infers_in_column_order() -> None:
    core, _ = _core()
    ok = _result("a" * 64)
    steps, value = _drive(_records_flow(core), [_metadata(("a", "b")), ok])
    assert [s.method for s in steps] == ["model_metadata", "infer"]
    assert steps[0].args == ("tab", None) and steps[0].kwargs["timeout_s"] == pytest.approx(10.0)
    model, inputs = steps[1].args
    assert inputs["x"].tolist() == [[1.0, 2.0]] and steps[1].kwargs["request_id"] == "r"
    assert value is ok
    steps, value = _drive(_records_flow(core), [ok])  # cached
    assert [s.method for s in steps] == ["infer"] and value is ok


def test_infer_records_asks_the_config_when_the_metadata_has_no_feature_names() -> None:
    core, _ = _core()

    class Config:
        feature_names = ("b", "a")

    steps, _ = _drive(_records_flow(core), [_metadata(None), Config(), _result(None)])
    assert [s.method for s in steps] == ["model_metadata", "model_config", "infer"]
    assert steps[2].args[1]["x"].tolist() == [[2.0, 1.0]]


def test_infer_records_resends_when_a_reload_changed_the_columns() -> None:
    core, _ = _core()
    new = _result("b" * 64)
    answers = [_metadata(("a", "b")), new, _metadata(("b", "a"), "b" * 64), new]
    steps, value = _drive(_records_flow(core), answers)
    assert [s.method for s in steps] == ["model_metadata", "infer", "model_metadata", "infer"]
    assert steps[3].args[1]["x"].tolist() == [[2.0, 1.0]] and value is new


def test_infer_records_keeps_the_answer_when_a_reload_kept_the_columns() -> None:
    core, _ = _core()
    new = _result("b" * 64)
    steps, value = _drive(_records_flow(core), [_metadata(("a", "b")), new, _metadata(("a", "b"), "b" * 64)])
    assert [s.method for s in steps] == ["model_metadata", "infer", "model_metadata"] and value is new


def test_infer_records_refuses_a_model_that_changed_twice() -> None:
    core, _ = _core()
    answers = [_metadata(("a", "b")), _result("b" * 64), _metadata(("b", "a"), "b" * 64), _result("c" * 64)]
    with pytest.raises(FailedPrecondition, match="changed twice") as info:
        _drive(_records_flow(core), answers)
    assert info.value.request_id == "r"


def test_infer_records_gives_up_when_the_deadline_passed_between_steps() -> None:
    core, clock = _core()
    flow = _records_flow(core, timeout_s=1.0)
    next(flow)
    clock.now += 2.0
    with pytest.raises(DeadlineExceeded):
        flow.send(_metadata(("a", "b")))


def test_forget_drops_every_version_of_a_model() -> None:
    core, _ = _core()
    _drive(_records_flow(core), [_metadata(("a", "b")), _result(None)])
    _drive(_records_flow(core, version=2), [_metadata(("a", "b")), _result(None)])
    assert set(core.schemas) == {("tab", ""), ("tab", "2")}
    core.forget("other")
    assert len(core.schemas) == 2
    core.forget("tab")
    assert core.schemas == {}


def _explained(sha: str | None, version: str = "1") -> InferResult:
    params: dict[str, Any] = {"explain_method": "shapley_exact", "explain_output": "y"}
    if sha:
        params["model_sha256"] = sha
    return InferResult("tab", version, "", {"y": np.zeros((1, 1)), "attributions": np.ones((1, 1, 2), np.float32),
                                            "base_value": np.zeros((1, 1), np.float32)}, params)


def test_an_explanation_fetches_the_metadata_once_per_model_file() -> None:
    """The names come from the answering version's metadata, asked once per model file: the
    same file again needs no call; another file (same version, new SHA-256), another version
    or a forgotten model asks again."""
    core, _ = _core()
    steps, why = _drive(core.explanation("tab", _explained("a" * 64), 5.0), [_metadata(("a", "b"))])
    assert [(s.method, s.args, s.kwargs) for s in steps] == [("model_metadata", ("tab", "1"), {"timeout_s": 5.0})]
    assert why.top(1)[0][0] in ("a", "b") and why.method == "shapley_exact"
    steps, again = _drive(core.explanation("tab", _explained("a" * 64), None), [])
    assert steps == [] and again.top(2) == why.top(2)
    steps, renamed = _drive(core.explanation("tab", _explained("b" * 64), None), [_metadata(("c", "d"), "b" * 64)])
    assert len(steps) == 1 and {n for n, _ in renamed.top(2)} == {"c", "d"}
    steps, _ = _drive(core.explanation("tab", _explained("a" * 64, version="2"), None), [_metadata(("a", "b"))])
    assert [s.args for s in steps] == [("tab", "2")]
    core.forget("tab")
    assert core.metadata == {}
    steps, _ = _drive(core.explanation("tab", _explained("a" * 64), None), [_metadata(("a", "b"))])
    assert len(steps) == 1


# -- the retry loop's bookkeeping -----------------------------------------------------------------


def test_tries_fail_over_to_another_replica_at_once_then_give_up() -> None:
    core, _ = _core(("localhost:1", "localhost:2"), RetryPolicy(max_attempts=2))
    tries = core.tries(None, "r-9")
    first, remaining = tries.next()
    assert remaining == pytest.approx(10.0)
    assert tries.failed(first, FakeRpcError(grpc.StatusCode.UNAVAILABLE)) == 0.0
    second, _ = tries.next()
    assert second != first
    with pytest.raises(Unavailable) as info:
        tries.failed(second, FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    assert info.value.request_id == "r-9" and info.value.__context__ is None


def test_tries_refuse_to_start_past_the_deadline_and_mark_success() -> None:
    core, clock = _core(timeout_s=1.0)
    tries = core.tries(None, None)
    index, _ = tries.next()
    core.balancer.mark_unhealthy(index)
    assert tries.succeeded(index, "response") == "response"
    assert core.balancer.healthy_other_than(-1)
    clock.now += 5.0
    with pytest.raises(DeadlineExceeded, match="before it could be tried"):
        tries.next()


def test_a_cancellation_that_arrives_after_the_deadline_is_the_deadline() -> None:
    core, clock = _core(timeout_s=1.0)
    tries = core.tries(None, "r-1")
    index, _ = tries.next()
    with pytest.raises(Cancelled):  # before the deadline: a real cancellation
        tries.failed(index, FakeRpcError(grpc.StatusCode.CANCELLED, "CANCELLED"))
    clock.now += 1.5
    with pytest.raises(DeadlineExceeded, match="deadline passed") as info:
        tries.failed(index, FakeRpcError(grpc.StatusCode.CANCELLED, "CANCELLED"))
    assert info.value.request_id == "r-1"


# -- stream bookkeeping -----------------------------------------------------------------------------


def test_stream_state_yields_local_refusals_first_and_unanswered_requests_last() -> None:
    stream = _calls.StreamState()
    ok = InferRequest("m", {"x": np.zeros((1, 2), np.float32)}, request_id="a")
    unnamed = InferRequest("m", {"x": np.zeros((1, 2), np.float32)})
    messages = list(stream.encode_all([ok, ok, unnamed]))  # the second "a" is refused: "a" is in flight
    assert [m.id for m in messages] == ["a", "2"]
    response = pb.ModelStreamInferResponse(error_message="nope", infer_response=pb.ModelInferResponse(id="a"))
    items = list(stream.on_response(response))
    assert isinstance(items[0], InvalidInputError) and items[0].request_id == "a"
    assert isinstance(items[1], StreamRequestError) and items[1].request_id == "a"
    end = list(stream.on_end())
    assert [(type(e), e.request_id) for e in end] == [(StreamRequestError, "2")]


def test_stream_refuses_an_item_that_is_not_a_request_locally() -> None:
    stream = _calls.StreamState()
    ok = InferRequest("m", {"x": np.zeros((1, 2), np.float32)}, request_id="a")
    messages = list(stream.encode_all([{"x": 1}, ok]))  # type: ignore[list-item]
    assert [m.id for m in messages] == ["a"]
    (refused,) = list(stream.drain_local())
    assert isinstance(refused, InvalidInputError) and "stream item 0 is a dict" in refused.message


def test_stream_failed_marks_an_unavailable_replica_down() -> None:
    core, _ = _core(("localhost:1", "localhost:2"))
    error = core.stream_failed(1, FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    assert isinstance(error, Unavailable)
    assert not core.balancer.healthy_other_than(0)
