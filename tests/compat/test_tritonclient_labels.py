"""Version labels with unmodified tritonclient: `model_version` takes a label in infer,
is_model_ready, get_model_metadata and get_model_config, and the answer names the numeric
version and the label (response parameter `version_label`)."""
from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

import rollout_models
from conftest import server_process

assert "medserve.protos.grpc_service_pb2" not in sys.modules


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repo = rollout_models.repo_with_versions(tmp_path_factory.mktemp("labels") / "repo",
                                             labels='{"stable": 1, "canary": 2}')
    with server_process(repo) as (port, _proc):
        yield f"127.0.0.1:{port}"


def test_tritonclient_reaches_versions_by_label(url: str) -> None:
    client = tc.InferenceServerClient(url)
    try:
        x = rollout_models.grid(4)
        for asked, version in (("stable", "1"), ("canary", "2"), ("", "1")):
            inp = tc.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("m", [inp], model_version=asked)
            response = result.get_response()
            assert response.model_version == version
            assert response.parameters["version_label"].string_param == (asked or "stable")
            np.testing.assert_array_equal(result.as_numpy("label"), (x[:, 0] > (0.5 if version == "1" else 0.6)))
        assert client.is_model_ready("m", "canary")
        assert client.get_model_metadata("m", "canary").name == "m"
        assert client.get_model_config("m", "stable").config.name == "m"
        with pytest.raises(InferenceServerException, match="nightly"):
            client.get_model_metadata("m", "nightly")
    finally:
        client.close()
