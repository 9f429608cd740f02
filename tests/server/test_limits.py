"""Limits that hold before work is done, against a real server: message size, concurrent calls,
streams per connection, keepalive enforcement, connection age, tensor and BYTES element caps,
and `refuse_non_finite`."""
from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos import grpc_service_pb2_grpc as pb_grpc
from medserve.protos.wire import to_raw
from medserve.server.config import ServerConfig
from medserve.server.errors import InvalidSetting

import onnx_models
from conftest import gated_repository, running_server, wait_for


def affine(x: np.ndarray, model: str = "affine") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x))
    return req


def text(n: int, size: int = 1) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="strings")
    req.inputs.add(name="text", datatype="BYTES", shape=[n, 1])
    req.raw_input_contents.append(b"".join(struct.pack("<I", size) + b"a" * size for _ in range(n)))
    return req


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def watch(channel: grpc.Channel) -> list[grpc.ChannelConnectivity]:
    """The channel's connectivity states as they change (public API: `subscribe`)."""
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append, try_to_connect=False)
    return states


def dropped(states: list[grpc.ChannelConnectivity]) -> bool:
    """The connection was READY and then was closed."""
    ready = grpc.ChannelConnectivity.READY
    return ready in states and any(s != ready for s in states[states.index(ready) + 1:])


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    onnx_models.affine(root / "affine" / "1" / "model.onnx")
    onnx_models.strings(root / "strings" / "1" / "model.onnx")
    onnx_models.slow(root / "slow" / "1" / "model.onnx", layers=4)
    onnx_models.write_config(root, "slow", "max_batch_size: 1\ndynamic_batching { }\n")
    onnx_models.affine(root / "strict" / "1" / "model.onnx")
    onnx_models.write_config(root, "strict", 'parameters { key: "refuse_non_finite" value: { string_value: "true" } }\n')
    return root


def test_the_default_message_cap_is_64_mib() -> None:
    assert ServerConfig(repository="r").max_message_bytes == 16 << 20


def test_a_message_over_the_cap_is_refused_before_it_is_parsed(repo: Path) -> None:
    with running_server(repo, max_message_bytes=1 << 20) as server:
        stub = server.stub()
        big = affine(np.zeros((70_000, 4), np.float32))  # 1.1 MB
        assert code_of(lambda: stub.ModelInfer(big, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(lambda: stub.ModelInfer(affine(np.zeros((2, 4), np.float32)), timeout=30)) == grpc.StatusCode.OK


def test_tensor_and_bytes_element_caps(repo: Path) -> None:
    with running_server(repo, max_tensor_elements=400, max_bytes_elements=8, max_bytes_element_size=16) as server:
        stub = server.stub()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(affine(np.zeros((101, 4), np.float32)), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shape [101, 4] has 404 elements; the server accepts at most 400 per tensor" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(text(9), timeout=30)
        assert "9 BYTES elements; the server accepts at most 8" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(text(2, size=17), timeout=30)
        assert "BYTES element 0 is longer than 16 bytes, the most accepted" in info.value.details()
        assert "17" not in info.value.details()  # an element's length is the payload's: never echoed
        typed = pb.ModelInferRequest(model_name="strings")
        typed.inputs.add(name="text", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"b" * 17)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(typed, timeout=30)
        assert "a BYTES element is longer than 16 bytes" in info.value.details()
        assert "17" not in info.value.details()
        assert stub.ModelInfer(text(8, size=16), timeout=30).outputs[0].name == "upper"


def test_text_and_input_count_budgets_reach_the_server(repo: Path) -> None:
    """`--max-text-bytes` (ServerConfig.max_text_bytes) refuses naming the flag; the defaults hold a
    batch of notes and refuse a million strings (the element cap is 65,536 since issue 25)."""
    assert ServerConfig(repository=str(repo)).max_text_bytes == 8 << 20
    assert ServerConfig(repository=str(repo)).max_bytes_elements == 1 << 16
    with pytest.raises(InvalidSetting, match="--max-text-bytes 0: expected >= 1"):
        ServerConfig(repository=str(repo), max_text_bytes=0)
    from medserve.server import cli

    args = cli.build_parser().parse_args(["serve", "--repository", str(repo), "--max-text-bytes", "1234"])
    assert cli._server_config(args).max_text_bytes == 1234
    default = cli._server_config(cli.build_parser().parse_args(["serve", "--repository", str(repo)]))
    assert (default.max_text_bytes, default.max_bytes_elements) == (8 << 20, 1 << 16)
    with running_server(repo, max_text_bytes=40) as server:
        stub = server.stub()
        assert stub.ModelInfer(text(2, size=20), timeout=30).outputs[0].name == "upper"
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(text(3, size=20), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than 40 bytes of text together" in info.value.details()
        assert "--max-text-bytes" in info.value.details() and "60" not in info.value.details()
        many = pb.ModelInferRequest(model_name="affine")
        for i in range(1025):
            many.inputs.add(name=f"t{i}", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([0.0] * 4)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(many, timeout=30)
        assert "1025 inputs; the server accepts at most 1024 per request" in info.value.details()


def test_refuse_non_finite_names_the_tensor_and_never_the_value(repo: Path) -> None:
    with running_server(repo) as server:
        stub = server.stub()
        poisoned = np.array([[1.0, np.nan, 3.0, np.inf]], np.float32)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(affine(poisoned, "strict"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            "model 'strict' version 1: input 'x': holds NaN or infinite values, which this model refuses "
            "(refuse_non_finite)"
        )
        assert stub.ModelInfer(affine(poisoned), timeout=30).outputs  # the default passes them on, as Triton


def test_calls_beyond_the_concurrency_cap_are_refused(repo: Path) -> None:
    gate = threading.Event()
    with running_server(repo, repository_cls=gated_repository({"slow": gate}), max_concurrent_rpcs=2) as server:
        stub = server.stub()
        x = affine(np.zeros((1, 1024), np.float32), "slow")
        held = [stub.ModelInfer.future(x, timeout=60) for _ in range(2)]
        batcher = server.server.repository.get("slow").batcher
        wait_for(lambda: batcher.stats().in_flight_requests + batcher.stats().queued == 2)
        assert code_of(lambda: stub.ModelInfer(x, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.set()
        assert all(f.result().outputs for f in held)
        assert code_of(lambda: stub.ModelInfer(x, timeout=30)) == grpc.StatusCode.OK


def test_a_full_queue_is_refused_with_a_retry_hint(repo: Path) -> None:
    """RESOURCE_EXHAUSTED for a full queue names the model and carries `grpc-retry-pushback-ms`
    (gRPC's retry machinery and medserve's client library wait that long)."""
    gate = threading.Event()
    with running_server(repo, repository_cls=gated_repository({"slow": gate}), max_queue_size=2) as server:
        stub = server.stub()
        x = affine(np.zeros((1, 1024), np.float32), "slow")
        held = [stub.ModelInfer.future(x, timeout=60) for _ in range(3)]  # one runs (held), two queue
        batcher = server.server.repository.get("slow").batcher
        wait_for(lambda: batcher.stats().in_flight_requests == 1 and batcher.stats().queued == 2)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(x, timeout=30)
        gate.set()
        assert all(f.result().outputs for f in held)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'slow'" in info.value.details() and "queue full" in info.value.details()
    pushback = dict(info.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    assert pushback is not None and 1 <= int(pushback) <= 1000


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _h2_read(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """One HTTP/2 frame: (type, flags, stream id, payload)."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data

    head = exactly(9)
    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, exactly(int.from_bytes(head[:3], "big"))


def test_a_stream_beyond_the_cap_is_refused_by_the_server(repo: Path) -> None:
    """Speaking HTTP/2 by hand (a client that ignores the advertised cap): the server advertises
    SETTINGS_MAX_CONCURRENT_STREAMS = --max-streams-per-connection and, with two streams open,
    refuses a third with RST_STREAM REFUSED_STREAM. No time window: the refusal is a frame."""
    settings_frame, headers_frame, rst_stream, refused_stream, max_concurrent_streams = 4, 1, 3, 7, 3
    with running_server(repo, max_streams_per_connection=2) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(settings_frame, 0, 0))
            kind, flags = -1, 1
            while not (kind == settings_frame and not flags & 1):
                kind, flags, _, body = _h2_read(sock)
            settings = dict(struct.unpack(">HI", body[i:i + 6]) for i in range(0, len(body), 6))
            assert settings[max_concurrent_streams] == 2
            sock.sendall(_h2_frame(settings_frame, 1, 0))  # ACK: the cap is in force from here
            # HPACK literals without indexing; END_HEADERS and no END_STREAM: each stream stays open.
            fields = ((":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
                      (":authority", server.target), ("content-type", "application/grpc"), ("te", "trailers"))
            block = b"".join(bytes([0, len(k)]) + k.encode() + bytes([len(v)]) + v.encode() for k, v in fields)
            sock.sendall(b"".join(_h2_frame(headers_frame, 4, sid, block) for sid in (1, 3, 5)))
            refused = []
            while not refused:
                kind, _, stream, body = _h2_read(sock)
                if kind == rst_stream:
                    refused.append((stream, int.from_bytes(body, "big")))
            assert refused == [(5, refused_stream)]


def test_one_connection_runs_the_calls_over_the_stream_cap_in_turn(repo: Path) -> None:
    """gRPC's client honours the cap: two calls reach the model, the third waits for a stream
    (not an error) and runs once one is free."""
    gate = threading.Event()
    with running_server(repo, repository_cls=gated_repository({"slow": gate}), max_streams_per_connection=2) as server:
        stub = server.stub()  # one channel: one connection
        x = affine(np.zeros((1, 1024), np.float32), "slow")
        calls = [stub.ModelInfer.future(x, timeout=60) for _ in range(3)]
        batcher = server.server.repository.get("slow").batcher
        wait_for(lambda: batcher.stats().in_flight_requests + batcher.stats().queued == 2)
        assert not any(c.done() for c in calls)
        gate.set()
        assert all(c.result().outputs for c in calls)


def test_keepalive_enforcement_and_connection_limits_reach_grpc(repo: Path) -> None:
    """The HTTP/2 policy is gRPC's own (its ping strikes, GOAWAY): what medserve owns is handing
    it the configured values. (A Python client cannot ping fast enough to show the GOAWAY.)"""
    from medserve.server.app import MedserveServer

    config = ServerConfig(repository=str(repo), min_ping_interval_s=7.5, keepalive_time_s=30.0,
                          keepalive_timeout_s=5.0, max_connection_idle_s=60.0, max_streams_per_connection=3)
    options = dict(MedserveServer(config)._grpc_options())  # noqa: SLF001 - the options handed to grpc
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 7500
    assert options["grpc.http2.max_ping_strikes"] == 2
    assert options["grpc.keepalive_time_ms"] == 30000 and options["grpc.keepalive_timeout_ms"] == 5000
    assert options["grpc.max_connection_idle_ms"] == 60000 and options["grpc.max_concurrent_streams"] == 3


def test_connections_are_recycled_at_their_maximum_age(repo: Path) -> None:
    with running_server(repo, max_connection_age_s=0.3, max_connection_age_grace_s=5.0) as server:
        channel = grpc.insecure_channel(server.target)
        states = watch(channel)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        wait_for(lambda: dropped(states), timeout_s=10)  # the server recycled the connection
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live  # and the channel reconnects
        channel.close()
