"""Retry schedule, deadlines and replica choice, with a fake clock, a fake sleep and a fake
random source: no real sleeping. The client-level tests talk to a scripted in-test gRPC server
whose answers (status, push-back) are chosen per call."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from medserve.clients import Client, InvalidArgument, ResourceExhausted, RetryPolicy, Unavailable
from medserve.clients._resilience import Attempts, Balancer
from medserve.clients.errors import error_for_status
from medserve.protos import grpc_service_pb2 as pb


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _unavailable(pushback_s: float | None = None) -> Exception:
    return error_for_status(grpc.StatusCode.UNAVAILABLE, "down", retry_pushback_s=pushback_s)


# -- the schedule -------------------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0, jitter=1.0)
    no_jitter = Attempts(policy, 60, t.clock, lambda: 0.0)
    assert [no_jitter.backoff_s(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    half = Attempts(policy, 60, t.clock, lambda: 0.5)
    assert [half.backoff_s(n) for n in range(1, 4)] == pytest.approx([0.05, 0.1, 0.2])
    fixed = Attempts(RetryPolicy(initial_backoff_s=0.1, jitter=0.0), 60, t.clock, lambda: 0.99)
    assert fixed.backoff_s(1) == pytest.approx(0.1)


def test_only_unavailable_and_resource_exhausted_are_retried() -> None:
    t = FakeTime()
    for code in grpc.StatusCode:
        attempts = Attempts(RetryPolicy(), 60, t.clock, lambda: 0.0)
        delay = attempts.next_delay_s(error_for_status(code, "x"))
        retried = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert (delay is not None) == retried, code


def test_attempts_are_bounded() -> None:
    t = FakeTime()
    attempts = Attempts(RetryPolicy(max_attempts=3), 60, t.clock, lambda: 0.0)
    assert attempts.next_delay_s(_unavailable()) is not None
    assert attempts.next_delay_s(_unavailable()) is not None
    assert attempts.next_delay_s(_unavailable()) is None  # the third try was the last


def test_no_wait_runs_to_or_past_the_deadline_and_time_left_shrinks() -> None:
    t = FakeTime()
    policy = RetryPolicy(max_attempts=100, initial_backoff_s=0.4, max_backoff_s=0.4, jitter=0.0)
    attempts = Attempts(policy, 1.0, t.clock, lambda: 0.0)
    assert attempts.remaining_s() == pytest.approx(1.0)
    t.now += 0.3
    assert attempts.remaining_s() == pytest.approx(0.7)
    assert attempts.next_delay_s(_unavailable()) == pytest.approx(0.4)  # ends at 0.7 < 1.0
    t.now += 0.4
    assert attempts.next_delay_s(_unavailable()) is None  # would end at 1.1 > 1.0


def test_server_pushback_replaces_the_backoff_and_a_negative_one_stops() -> None:
    t = FakeTime()
    attempts = Attempts(RetryPolicy(initial_backoff_s=0.01), 60, t.clock, lambda: 0.0)
    assert attempts.next_delay_s(_unavailable(pushback_s=2.5)) == 2.5
    assert attempts.next_delay_s(_unavailable(pushback_s=-1.0)) is None


def test_failover_to_a_healthy_replica_is_immediate() -> None:
    t = FakeTime()
    attempts = Attempts(RetryPolicy(initial_backoff_s=0.5, jitter=0.0), 60, t.clock, lambda: 0.0)
    assert attempts.next_delay_s(_unavailable(), failover=True) == 0.0
    exhausted = error_for_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    assert attempts.next_delay_s(exhausted, failover=True) == 1.0  # backoff, not failover


def test_balancer_round_robin_skips_a_cooling_replica_until_its_cooldown_ends() -> None:
    t = FakeTime()
    balancer = Balancer(["a", "b", "c"], cooldown_s=5.0, clock=t.clock)
    assert [balancer.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    balancer.mark_unhealthy(1)
    assert [balancer.pick() for _ in range(4)] == [0, 2, 2, 0]
    assert balancer.healthy_other_than(0)
    t.now += 5.0
    assert sorted(balancer.pick() for _ in range(3)) == [0, 1, 2]
    for i in range(3):
        balancer.mark_unhealthy(i)
        t.now += 1.0
    assert balancer.pick() == 0  # all cooling: the one that recovers first
    assert not balancer.healthy_other_than(0)
    balancer.mark_healthy(0)
    assert balancer.healthy_other_than(1)


# -- the client's loop against a scripted server ---------------------------------------------------


@dataclass
class Script:
    """Answers for successive ModelInfer calls: (status, pushback ms or None); then OK."""

    answers: list[tuple[grpc.StatusCode, str | None]] = field(default_factory=list)
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        with self.lock:
            self.calls += 1
            answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            code, pushback = answer
            if pushback is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", pushback),))
            context.abort(code, f"scripted {code.name}")
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="y", datatype="FP32", shape=[1])
        response.raw_output_contents.append(np.float32(7).tobytes())
        return response


@pytest.fixture
def scripted() -> Iterator[Callable[[], tuple[str, Script]]]:
    servers: list[grpc.Server] = []

    def start() -> tuple[str, Script]:
        script = Script()
        server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.unary_unary_rpc_method_handler(
            script.handle,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", script

    yield start
    for server in servers:
        server.stop(None)


X = {"x": np.zeros((1, 1), np.float32)}


def test_client_honours_pushback_and_retries_until_it_succeeds(scripted: Callable[[], tuple[str, Script]]) -> None:
    target, script = scripted()
    script.answers = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "300"), (grpc.StatusCode.UNAVAILABLE, "120")]
    t = FakeTime()
    with Client(target, clock=t.clock, sleep=t.sleep, random=lambda: 0.0) as client:
        result = client.infer("m", X, request_id="r7")
    assert result["y"].tolist() == [7.0] and result.request_id == "r7"
    assert script.calls == 3
    assert t.sleeps == pytest.approx([0.3, 0.12])


def test_client_backs_off_exponentially_without_pushback(scripted: Callable[[], tuple[str, Script]]) -> None:
    target, script = scripted()
    script.answers = [(grpc.StatusCode.RESOURCE_EXHAUSTED, None)] * 3
    t = FakeTime()
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=3.0, jitter=0.5)
    with Client(target, retries=policy, clock=t.clock, sleep=t.sleep, random=lambda: 1.0) as client:
        client.infer("m", X)
    assert t.sleeps == pytest.approx([0.05, 0.15, 0.45])


def test_client_gives_up_after_max_attempts_and_raises_the_last_error(
    scripted: Callable[[], tuple[str, Script]],
) -> None:
    target, script = scripted()
    script.answers = [(grpc.StatusCode.RESOURCE_EXHAUSTED, None)] * 10
    t = FakeTime()
    with (
        Client(target, retries=RetryPolicy(max_attempts=3), clock=t.clock, sleep=t.sleep) as client,
        pytest.raises(ResourceExhausted, match="scripted RESOURCE_EXHAUSTED") as info,
    ):
        client.infer("m", X, request_id="q")
    assert script.calls == 3 and len(t.sleeps) == 2
    assert info.value.request_id == "q" and info.value.__cause__ is None


def test_client_never_sleeps_past_the_deadline(scripted: Callable[[], tuple[str, Script]]) -> None:
    target, script = scripted()
    script.answers = [(grpc.StatusCode.UNAVAILABLE, "400")] * 10
    t = FakeTime()
    with (
        Client(target, retries=RetryPolicy(max_attempts=50), clock=t.clock, sleep=t.sleep) as client,
        pytest.raises(Unavailable),
    ):
        client.infer("m", X, timeout_s=1.0)
    assert t.sleeps == pytest.approx([0.4, 0.4])  # a third wait would end at 1.2 s > 1.0 s
    assert script.calls == 3


def test_client_does_not_retry_other_codes(scripted: Callable[[], tuple[str, Script]]) -> None:
    target, script = scripted()
    script.answers = [(grpc.StatusCode.INVALID_ARGUMENT, None)]
    t = FakeTime()
    with Client(target, clock=t.clock, sleep=t.sleep) as client, pytest.raises(InvalidArgument):
        client.infer("m", X)
    assert script.calls == 1 and t.sleeps == []


def test_client_fails_over_to_the_healthy_replica_without_waiting(
    scripted: Callable[[], tuple[str, Script]],
) -> None:
    (down, down_script), (up, up_script) = scripted(), scripted()
    down_script.answers = [(grpc.StatusCode.UNAVAILABLE, None)] * 100
    t = FakeTime()
    with Client([down, up], clock=t.clock, sleep=t.sleep) as client:
        for _ in range(6):
            client.infer("m", X)
    assert t.sleeps == []
    assert down_script.calls == 1  # then skipped during its cool-down
    assert up_script.calls == 6
