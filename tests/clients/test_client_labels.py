"""The client library with version labels and a canary, against a real server: ``version=``
takes a label, ``routing_key=`` keeps an encounter on one side of the canary (sync, asyncio,
stream), and the result names the version and the label that reached it."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from medserve.clients import AsyncClient, Client, InferRequest, InferResult

import rollout_models
from conftest import running_server

LABELS = '{"stable": 1, "canary": 2, "canary_percent": 50, "canary_seed": "client test seed"}'


def test_version_takes_a_label_and_routing_key_keeps_an_encounter_on_one_side(tmp_path: Path) -> None:
    repo = rollout_models.repo_with_versions(tmp_path / "repo", labels=LABELS)
    x = {"x": rollout_models.grid(3)}
    with running_server(repo) as srv, Client(srv.target) as client:
        canary = client.infer("m", x, version="canary")
        assert (canary.model_version, canary.version_label) == ("2", "canary")
        numbered = client.infer("m", x, version=1)
        assert (numbered.model_version, numbered.version_label) == ("1", None)
        sides = {}
        for i in range(40):
            result = client.infer("m", x, routing_key=f"enc-{i}")
            sides[i] = (result.model_version, result.version_label)
            assert client.infer("m", x, routing_key=f"enc-{i}").model_version == result.model_version
        assert set(sides.values()) == {("1", "stable"), ("2", "canary")}
        streamed = list(client.infer_stream(InferRequest("m", x, routing_key=f"enc-{i}") for i in range(40)))
        assert all(isinstance(r, InferResult) for r in streamed)
        assert {int(r.request_id): r.model_version for r in streamed if isinstance(r, InferResult)} == {
            i: v for i, (v, _) in sides.items()}
        assert client.model_ready("m", "canary") and client.model_metadata("m", "stable").name == "m"

        async def asynchronous() -> tuple[str, str | None]:
            async with AsyncClient(srv.target) as aclient:
                result = await aclient.infer("m", x, routing_key="enc-3")
                return result.model_version, result.version_label

        assert asyncio.run(asynchronous()) == sides[3]
    assert np.asarray(canary["label"]).shape == (3,)
