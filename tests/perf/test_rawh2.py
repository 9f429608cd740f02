"""The load processes' HTTP/2 transport (rawh2, hand-framed) against a real medserve server:
the same response bytes as grpcio, every status, flow control with messages far above the
windows, deadlines, and a server that goes away mid-call."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.perf import rawh2
from medserve.perf.scenario import INFER_PATH
from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import from_raw

import onnx_models
from conftest import running_server

WIDE = 60_000  # features: a 240 kB request and a 240 kB response, past every 64 kB window


@pytest.fixture(params=[rawh2.Channel], ids=["rawh2"])
def channel_class(request: pytest.FixtureRequest) -> type[rawh2.Channel]:
    return request.param


@pytest.fixture
def repo(make_repo) -> Path:
    return make_repo(
        affine=onnx_models.affine,
        wide=lambda p: onnx_models.affine(p, features=WIDE),
        slow=lambda p: onnx_models.slow(p, width=512, layers=60),
    )


def _request(model: str, x: np.ndarray) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.astype(np.float32).tobytes())
    return req.SerializeToString()


def _grpcio(target: str, body: bytes, path: str = INFER_PATH) -> bytes:
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        return channel.unary_unary(path, request_serializer=None, response_deserializer=None)(body, timeout=30)


async def _call(cls: type[rawh2.Channel], target: str, body: bytes, path: str = INFER_PATH,
                timeout: float | None = None) -> bytes:
    channel = cls(target)
    await channel.connect()
    try:
        return await channel.unary(path)(body, timeout)
    finally:
        await channel.close()


async def _status(cls: type[rawh2.Channel], target: str, body: bytes, path: str = INFER_PATH,
                  timeout: float | None = None) -> rawh2.RpcError:
    with pytest.raises(rawh2.RpcError) as info:
        await asyncio.wait_for(_call(cls, target, body, path, timeout), 30)
    return info.value


@pytest.mark.parametrize("model,features", [("affine", 4), ("wide", WIDE)])
def test_response_bytes_equal_grpcio_and_the_answer_is_right(repo: Path, channel_class: type[rawh2.Channel], model: str,
                                                            features: int) -> None:
    x = np.random.default_rng(0).normal(size=(3, features)).astype(np.float32)
    body = _request(model, x)
    with running_server(repo) as srv:
        raw = asyncio.run(_call(channel_class, srv.target, body))
        assert raw == _grpcio(srv.target, body)
    response = pb.ModelInferResponse.FromString(raw)
    y = from_raw(response.raw_output_contents[0], "FP32", response.outputs[0].shape)
    np.testing.assert_allclose(y, onnx_models.affine_answer(x)["y"], rtol=1e-6)


def test_every_outcome_is_the_servers_status_with_its_message(repo: Path, channel_class: type[rawh2.Channel]) -> None:
    x = np.ones((1, 4), np.float32)
    with running_server(repo) as srv:
        unknown = asyncio.run(_status(channel_class, srv.target, _request("nope", x)))
        assert unknown.code == grpc.StatusCode.NOT_FOUND.value[0] and "'nope'" in unknown.message
        shape = asyncio.run(_status(channel_class, srv.target, _request("affine", np.ones((1, 5), np.float32))))
        assert shape.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "expected shape" in shape.message
        method = asyncio.run(_status(channel_class, srv.target, b"", "/inference.GRPCInferenceService/NoSuchMethod"))
        assert method.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        late = asyncio.run(_status(channel_class, srv.target, _request("slow", np.ones((1, 512), np.float32)), timeout=0.001))
        assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


def test_interleaved_successes_and_failures_on_one_connection_keep_their_own_status(
        repo: Path, channel_class: type[rawh2.Channel]) -> None:
    """The server's HPACK table changes as new header values appear; cached blocks must not
    hand one call's status to another."""
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(1, 4)).astype(np.float32) for _ in range(60)]
    bodies = [_request("affine" if i % 3 else f"missing{i}", x) for i, x in enumerate(xs)]

    async def run(target: str) -> list[bytes | BaseException]:
        channel = channel_class(target)
        await channel.connect()
        call = channel.unary(INFER_PATH)
        try:
            return await asyncio.gather(*(call(b) for b in bodies), return_exceptions=True)
        finally:
            await channel.close()

    with running_server(repo) as srv:
        results = asyncio.run(run(srv.target))
    for i, (x, result) in enumerate(zip(xs, results, strict=True)):
        if i % 3:
            assert isinstance(result, bytes)
            out = pb.ModelInferResponse.FromString(result)
            np.testing.assert_allclose(from_raw(out.raw_output_contents[0], "FP32", (1, 4)), 2 * x + 1, rtol=1e-6)
        else:
            assert isinstance(result, rawh2.RpcError) and result.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert f"'missing{i}'" in result.message


def test_no_server_and_a_server_that_goes_away_give_unavailable(repo: Path, channel_class: type[rawh2.Channel]) -> None:
    body = _request("affine", np.ones((1, 4), np.float32))

    async def refused(port: int) -> rawh2.RpcError:
        channel = channel_class(f"127.0.0.1:{port}")
        await channel.connect()
        with pytest.raises(rawh2.RpcError) as info:
            await asyncio.wait_for(channel.unary(INFER_PATH)(body), 10)
        await channel.close()
        return info.value

    with running_server(repo) as srv:
        target, port = srv.target, srv.port

        async def then_stop() -> tuple[bytes, rawh2.RpcError]:
            channel = channel_class(target)
            await channel.connect()
            call = channel.unary(INFER_PATH)
            first = await call(body)
            await asyncio.get_running_loop().run_in_executor(None, srv.call, srv.server.stop())
            with pytest.raises(rawh2.RpcError) as info:
                for _ in range(100):  # until the GOAWAY or the closed socket has arrived
                    await asyncio.wait_for(call(body), 10)
                    await asyncio.sleep(0.02)
            await channel.close()
            return first, info.value

        first, gone = asyncio.run(then_stop())
    assert pb.ModelInferResponse.FromString(first).model_name == "affine"
    assert gone.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert asyncio.run(refused(port)).code == grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.mark.parametrize("seconds,header", [
    (0.0000001, b"1u"), (0.25, b"250000u"), (150.0, b"150000m"), (200_000.0, b"200000S"), (1e9, b"16666667M"),
])
def test_grpc_timeout_header_uses_the_finest_unit_that_fits_eight_digits(seconds: float, header: bytes) -> None:
    assert rawh2.timeout_header(seconds) == header
