"""Explanations over the same protocol (request parameter `explain`): ground truth on a linear
model, additivity on tabular models, planted signals found by occlusion in images and signals,
and the sanity check after Adebayo et al. (2018): randomised weights change the attributions."""
from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from medserve.protos import grpc_service_pb2 as pb
from medserve.protos.wire import from_raw, to_raw
from medserve.server.layout import card_digest

from conftest import running_server

torch = pytest.importorskip("torch")
sklearn_datasets = pytest.importorskip("sklearn.datasets")


def with_reference(repo: Path, name: str, reference: dict[str, np.ndarray]) -> None:
    """Add reference rows to a published version's card (what the exporters write)."""
    card_path = repo / name / "1" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["reference"] = {k: v.tolist() for k, v in reference.items()}
    card["card_sha256"] = card_digest(card)  # republished: the server checks the card's own digest
    card_path.write_text(json.dumps(card))


def explain(stub, model: str, name: str, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, str]]:  # type: ignore[no-untyped-def]
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(to_raw(x.astype(np.float32)))
    req.parameters["explain"].bool_param = True
    response = stub.ModelInfer(req, timeout=120)
    out = {o.name: from_raw(raw, o.datatype, o.shape) for o, raw in zip(response.outputs, response.raw_output_contents,
                                                                         strict=True)}
    return out, {k: v.string_param for k, v in response.parameters.items()}


def test_linear_model_attributions_are_coef_times_the_distance_to_the_reference_mean(tmp_path: Path) -> None:
    from sklearn.linear_model import LinearRegression

    from medserve.exporters import export

    x, y = sklearn_datasets.load_diabetes(return_X_y=True)
    model = LinearRegression().fit(x, y)
    repo = tmp_path / "repo"
    report = export(model, x[:32], repo, "lin")
    reference = x[np.random.default_rng(0).choice(len(x), 8, replace=False)].astype(np.float32)
    with_reference(repo, "lin", {report.inputs[0].name: reference})
    rows = x[100:104].astype(np.float32)
    with running_server(repo) as server:
        out, params = explain(server.stub(), "lin", report.inputs[0].name, rows)
    assert params["explain_method"] in ("kernel_shap", "shapley_exact") and params["explain_output"] == "prediction"
    expected = model.coef_ * (rows - reference.mean(axis=0))
    np.testing.assert_allclose(out["attributions"][:, 0, :], expected, atol=1e-4)
    np.testing.assert_allclose(out["base_value"][:, 0], model.predict(reference).mean(), rtol=1e-5)
    np.testing.assert_allclose(out["attributions"].sum(axis=2) + out["base_value"], out["prediction"], atol=1e-3)


@pytest.mark.parametrize("family", ["random_forest", "logistic_regression"])
def test_tabular_attributions_add_up_to_the_output(tmp_path: Path, family: str) -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medserve.exporters import export

    x, y = sklearn_datasets.load_breast_cancer(return_X_y=True)
    model = (RandomForestClassifier(30, random_state=0) if family == "random_forest"
             else make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))).fit(x, y)
    repo = tmp_path / "repo"
    report = export(model, x[:32], repo, "bc")
    reference = np.percentile(x, np.linspace(5, 95, 8), axis=0).astype(np.float32)  # quantile rows
    with_reference(repo, "bc", {report.inputs[0].name: reference})
    with running_server(repo) as server:
        out, params = explain(server.stub(), "bc", report.inputs[0].name, x[:3])
        again, _ = explain(server.stub(), "bc", report.inputs[0].name, x[:3])
        first_row, _ = explain(server.stub(), "bc", report.inputs[0].name, x[:1])
    # 30 features: the forest's trees are read from its graph (exact TreeSHAP); the linear model's
    # coalitions are sampled
    assert params["explain_method"] == ("tree_shap" if family == "random_forest" else "kernel_shap")
    assert out["attributions"].shape == (3, 2, 30) and out["base_value"].shape == (3, 2)
    np.testing.assert_allclose(out["attributions"].sum(axis=2) + out["base_value"], out["probabilities"], atol=1e-3)
    # The coalitions are sampled once per model: asked again, alone or beside other rows, a
    # patient's explanation is the same.
    np.testing.assert_allclose(again["attributions"], out["attributions"], atol=1e-6)
    np.testing.assert_allclose(first_row["attributions"][0], out["attributions"][0], atol=1e-6)


def _planted(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images [n, 1, 16, 16] (class 1: a bright 4 x 4 patch) or signals [n, 1, 128] (class 1: a
    pulse 16 steps wide), at a random place; returns data, labels and the planted region's start."""
    shape = (n, 1, 16, 16) if kind == "image" else (n, 1, 128)
    data = rng.normal(0, 0.3, size=shape).astype(np.float32)
    labels = rng.integers(0, 2, n)
    starts = rng.integers(0, 13, size=(n, 2)) if kind == "image" else rng.integers(0, 113, size=(n, 1))
    for i in np.flatnonzero(labels):
        if kind == "image":
            r, c = starts[i]
            data[i, 0, r:r + 4, c:c + 4] += 3.0
        else:
            data[i, 0, starts[i, 0]:starts[i, 0] + 16] += 3.0
    return data, labels, starts


def _net(kind: str) -> torch.nn.Module:
    conv = torch.nn.Conv2d if kind == "image" else torch.nn.Conv1d
    pool = torch.nn.AdaptiveMaxPool2d(1) if kind == "image" else torch.nn.AdaptiveMaxPool1d(1)
    return torch.nn.Sequential(conv(1, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 8, 3, padding=1), torch.nn.ReLU(),
                               pool, torch.nn.Flatten(), torch.nn.Linear(8, 2))


def _train(net: torch.nn.Module, data: np.ndarray, labels: np.ndarray) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = torch.from_numpy(data), torch.from_numpy(labels)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()


def _served_attributions(tmp_path: Path, net: torch.nn.Module, data: np.ndarray, name: str) -> np.ndarray:
    from medserve.exporters import export

    repo = tmp_path / name
    report = export(net.eval(), torch.from_numpy(data[:8]), repo, name)
    input_name = report.inputs[0].name
    with_reference(repo, name, {input_name: np.zeros((1, *data.shape[1:]), np.float32)})
    parts = []
    with running_server(repo) as server:
        for start in range(0, len(data), 8):
            out, params = explain(server.stub(), name, input_name, data[start:start + 8])
            assert params["explain_method"] == "occlusion"
            parts.append(out["attributions"][:, 1])  # toward class 1
    return np.concatenate(parts)


@pytest.mark.parametrize("kind", ["image", "signal"])
def test_occlusion_finds_the_planted_signal_and_not_a_randomised_model(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data, labels, _ = _planted(kind, 256, rng)
    net = _net(kind)
    _train(net, data, labels)
    test, test_labels, starts = _planted(kind, 64, np.random.default_rng(1))
    positive = np.flatnonzero(test_labels)
    attributions = _served_attributions(tmp_path, net, test[positive], f"{kind}_trained")
    hits = 0
    for a, start in zip(attributions, starts[positive], strict=True):
        if kind == "image":
            r, c = np.unravel_index(np.argmax(a[0]), a[0].shape)
            hits += start[0] - 2 <= r < start[0] + 6 and start[1] - 2 <= c < start[1] + 6
        else:
            t = int(np.argmax(a[0]))
            hits += start[0] - 8 <= t < start[0] + 24
    assert hits / len(positive) >= 0.9, hits / len(positive)
    # Sanity (Adebayo et al. 2018): the same explanation of a model with randomised weights
    # must not look like the trained model's.
    random_net = _net(kind)
    random_attr = _served_attributions(tmp_path, random_net, test[positive], f"{kind}_random")
    from scipy.stats import spearmanr

    rho = np.nanmean([spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(attributions, random_attr, strict=True)])
    assert rho < 0.5, rho


def test_explain_refuses_clearly_when_it_cannot(tmp_path: Path) -> None:
    from sklearn.linear_model import LinearRegression

    from medserve.exporters import export

    x, y = sklearn_datasets.load_diabetes(return_X_y=True)
    repo = tmp_path / "repo"
    report = export(LinearRegression().fit(x, y), x[:32], repo, "noref")
    card_path = repo / "noref" / "1" / "model_card.json"
    card = json.loads(card_path.read_text())
    del card["reference"]  # as a card from before the exporters wrote reference rows
    card["card_sha256"] = card_digest(card)
    card_path.write_text(json.dumps(card))
    with running_server(repo) as server:
        with pytest.raises(grpc.RpcError) as info:
            explain(server.stub(), "noref", report.inputs[0].name, x[:1])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot be explained: its model card has no reference rows" in info.value.details()
        with_reference(repo, "noref", {report.inputs[0].name: x[:4]})
    with running_server(repo) as server:
        with pytest.raises(grpc.RpcError) as info:
            explain(server.stub(), "noref", report.inputs[0].name, x[:20])
        assert "explain takes at most 8 rows per request" in info.value.details()


def test_the_client_library_explains_records_by_feature_name(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medserve.clients import AsyncClient, Client
    from medserve.exporters import export

    data = sklearn_datasets.load_breast_cancer()
    names = [str(n) for n in data.feature_names[:6]]
    x = data.data[:, :6]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, data.target)
    repo = tmp_path / "repo"
    report = export(model, x[:32], repo, "bc6", feature_names=names, class_labels=["malignant", "benign"])
    with_reference(repo, "bc6", {report.inputs[0].name: np.percentile(x, [10, 30, 50, 70, 90], axis=0)})
    record = dict(zip(names, x[0].tolist(), strict=True))
    with running_server(repo) as server, Client(server.target, timeout_s=60) as client:
        why = client.explain("bc6", records=[record])
        assert why.method == "shapley_exact" and why.output == "probabilities"  # 2^6 x 5 fits the budget
        top = why.top(3, target="benign")
        assert len(top) == 3 and {n for n, _ in top} <= set(names)
        assert abs(top[0][1]) >= abs(top[1][1]) >= abs(top[2][1])
        total = why.attributions[""][0].sum(axis=-1) + why.base_value[0]
        np.testing.assert_allclose(total, why.result["probabilities"][0], atol=1e-3)

        async def via_asyncio() -> np.ndarray:
            async with AsyncClient(server.target, timeout_s=60) as aclient:
                explained = await aclient.explain("bc6", {report.inputs[0].name: x[:1].astype(np.float32)})
                return np.asarray(explained.attributions[""])

        import asyncio

        np.testing.assert_allclose(asyncio.run(via_asyncio()), why.attributions[""], atol=1e-6)


def test_a_mixed_table_gets_one_attribution_tensor_per_input_that_add_up_with_records(tmp_path: Path) -> None:
    """Numbers, text codes and integer codes as three typed inputs: `attributions.<input>` for
    each, together adding up to the output; `top` names the card's columns; records (column
    name -> value) fill the three inputs as the card's input_columns say."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from medserve.clients import Client
    from medserve.exporters import export

    rng = np.random.default_rng(0)
    n = 300
    age, rate = rng.normal(60, 12, n), rng.normal(85, 12, n)
    ward, grade = rng.choice(["icu", "general"], n), rng.integers(1, 4, n)
    table = np.empty((n, 4), dtype=object)
    for j, column in enumerate([age, ward, rate, grade]):
        table[:, j] = column.tolist()
    y = ((age - 60) / 12 + (rate - 85) / 12 + 1.5 * (ward == "icu") + 0.5 * grade > 1.5).astype(np.int64)
    prep = ColumnTransformer([("numbers", StandardScaler(), [0, 2]), ("codes", OneHotEncoder(handle_unknown="ignore"), [1]),
                              ("grade", OneHotEncoder(handle_unknown="ignore"), [3])])
    model = Pipeline([("prep", prep), ("model", LogisticRegression(max_iter=1000))]).fit(table, y)
    repo = tmp_path / "repo"
    export(model, table[:32], repo, "admission", feature_names=["age", "ward", "heart_rate", "grade"])
    records = [{"age": 71.0, "ward": "icu", "heart_rate": 118.0, "grade": 3},
               {"age": 45.0, "ward": "general", "heart_rate": 72.0, "grade": 1}]
    inputs = {"numeric": np.array([[r["age"], r["heart_rate"]] for r in records], np.float32),
              "categorical": np.array([[r["ward"]] for r in records], dtype=object),
              "categorical_int": np.array([[r["grade"]] for r in records], np.int64)}
    with running_server(repo) as server, Client(server.target) as client:
        why = client.explain("admission", inputs)
        by_records = client.explain("admission", records=records)
        predicted = client.infer_records("admission", records)
    for name, attribution in why.attributions.items():  # records fill the same three inputs
        np.testing.assert_allclose(by_records.attributions[name], attribution, atol=1e-6)
    np.testing.assert_array_equal(predicted["label"], why.result["label"])
    assert set(why.attributions) == {"numeric", "categorical", "categorical_int"}
    assert {k: v.shape for k, v in why.attributions.items()} == {
        "numeric": (2, 2, 2), "categorical": (2, 2, 1), "categorical_int": (2, 2, 1)}
    total = sum(a.sum(axis=2) for a in why.attributions.values()) + why.base_value
    np.testing.assert_allclose(total, why.result["probabilities"], atol=1e-3)
    top = dict(why.top(4, row=0, target=1))
    assert set(top) == {"age", "ward", "heart_rate", "grade"}
    assert top["heart_rate"] > 0 and top["ward"] > 0  # a fast heart and the ICU push the first row up


def test_token_occlusion_puts_the_top_attribution_on_the_planted_keyword(tmp_path: Path) -> None:
    """A keyword detector over token ids: wherever the keyword sits, the window holding it gets
    the largest attribution for the positive class and every other window about none; the first
    token always stays (so attention has something to attend to), and removing every other one
    gives the base value."""
    import onnx_models

    repo = tmp_path / "repo"
    onnx_models.keyword(repo / "kw" / "1" / "model.onnx", token=7)
    onnx_models.write_config(repo, "kw", "max_batch_size: 64\n")
    rng = np.random.default_rng(0)
    with running_server(repo) as server:
        stub = server.stub()
        for place in (3, 11, 20, 29):
            ids = rng.integers(20, 500, (1, 32))
            ids[0, 0], ids[0, place] = 101, 7
            req = pb.ModelInferRequest(model_name="kw")
            for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
                req.inputs.add(name=name, datatype="INT64", shape=array.shape)
                req.raw_input_contents.append(to_raw(array.astype(np.int64)))
            req.parameters["explain"].bool_param = True
            response = stub.ModelInfer(req, timeout=60)
            out = {o.name: from_raw(raw, o.datatype, o.shape)
                   for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)}
            attribution = out["attributions"][0, 1]  # [32]: the positive class, per token
            assert response.parameters["explain_method"].string_param == "occlusion"
            assert int(np.argmax(attribution)) == place or attribution[place] == attribution.max()
            outside = np.ones(32, bool)
            outside[place - 1:place + 2] = False  # the keyword's window (windows of 2 tokens here)
            assert np.abs(attribution[outside]).max() < 1e-6 < attribution[place]
            assert attribution[0] == 0
            np.testing.assert_allclose(out["base_value"][0], [1 - 1 / (1 + np.exp(3)), 1 / (1 + np.exp(3))], atol=1e-5)


def test_a_served_forest_is_explained_by_tree_shap_equal_to_every_coalition_and_a_gbm_classifier_is_not(
        tmp_path: Path) -> None:
    """A forest of 8 features served with explain=true: `explain_method` names TreeSHAP, its
    attributions add up to the served probabilities and equal the exact enumeration of all 2^8
    coalitions run through onnxruntime. A gradient-boosted classifier (a logistic of the trees'
    sum, not a sum over trees) keeps the Shapley values of its served probabilities."""
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier

    from medserve.exporters import export

    x, y = sklearn_datasets.load_breast_cancer(return_X_y=True)
    x = x[:, :8]
    repo = tmp_path / "repo"
    forest = RandomForestClassifier(25, max_depth=6, random_state=0).fit(x, y)
    gbm = GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0).fit(x, y)
    reference = np.percentile(x, np.linspace(10, 90, 5), axis=0).astype(np.float32)
    for name, model in (("forest", forest), ("gbm", gbm)):
        report = export(model, x[:32], repo, name)
        with_reference(repo, name, {report.inputs[0].name: reference})
    input_name = report.inputs[0].name
    rows = x[100:103].astype(np.float32)
    with running_server(repo) as server:
        out, params = explain(server.stub(), "forest", input_name, rows)
        boosted, boosted_params = explain(server.stub(), "gbm", input_name, rows)
    assert params["explain_method"] == "tree_shap" and params["explain_output"] == "probabilities"
    assert out["attributions"].shape == (3, 2, 8) and out["base_value"].shape == (3, 2)
    np.testing.assert_allclose(out["attributions"].sum(axis=2) + out["base_value"], out["probabilities"], atol=1e-5)
    # Ground truth: every coalition through onnxruntime, weighted exactly (2^8 x 5 rows).
    import onnxruntime as ort

    from medserve.server.explain import _all_masks, _shapley_weights

    session = ort.InferenceSession(str(repo / "forest" / "1" / "model.onnx"))
    masks = _all_masks(8)
    for i, row in enumerate(rows):
        mixed = np.where(masks[:, None, :], row[None, None, :], reference[None]).reshape(-1, 8)
        v = session.run(["probabilities"], {input_name: mixed})[0].reshape(len(masks), len(reference), 2).mean(axis=1)
        np.testing.assert_allclose(out["attributions"][i], (_shapley_weights(masks) @ v).T, atol=1e-5)
    assert boosted_params["explain_method"] == "shapley_exact"  # 2^8 x 5 fits the budget: every coalition
    np.testing.assert_allclose(boosted["attributions"].sum(axis=2) + boosted["base_value"], boosted["probabilities"],
                               atol=1e-5)


def test_explain_output_margin_explains_a_boosted_classifier_in_log_odds_and_is_refused_without_trees(
        tmp_path: Path) -> None:
    """`explain_output: margin` in the config: a gradient-boosted classifier's trees are explained
    where they add up (log-odds before its logistic): `explain_output` says `margin`, and the
    logistic of base value plus attributions is the served probability. A model with no such
    trees is refused at load, naming the config and the parameter."""
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    from medserve.clients import Client
    from medserve.exporters import export
    from medserve.server.errors import ModelLoadFailed

    x, y = sklearn_datasets.load_breast_cancer(return_X_y=True)
    repo = tmp_path / "repo"
    report = export(GradientBoostingClassifier(n_estimators=40, max_depth=3, random_state=0).fit(x, y), x[:32],
                    repo, "gbm")
    margin = "\nparameters { key: 'explain_output' value: { string_value: 'margin' } }\n"
    with (repo / "gbm" / "config.pbtxt").open("a") as f:
        f.write(margin)
    rows = x[100:104].astype(np.float32)
    with running_server(repo) as server, Client(server.target, timeout_s=60) as client:
        out, params = explain(server.stub(), "gbm", report.inputs[0].name, rows)
        # the client's top() picks the row's highest log-odds (the answer carries no 'margin' output)
        why = client.explain("gbm", {report.inputs[0].name: rows})
        assert why.output == "margin" and why.method == "tree_shap"
        for row in range(len(rows)):
            column = int(np.argmax(out["attributions"][row].sum(axis=1) + out["base_value"][row]))
            assert why.top(3, row=row) == why.top(3, row=row, target=column)
    assert params["explain_method"] == "tree_shap" and params["explain_output"] == "margin"
    log_odds = out["attributions"].sum(axis=2) + out["base_value"]  # [rows, 2]: each class's log-odds
    np.testing.assert_allclose(log_odds[:, 0], -log_odds[:, 1], atol=1e-5)
    np.testing.assert_allclose(1 / (1 + np.exp(-log_odds)), out["probabilities"], atol=1e-5)

    linear_repo = tmp_path / "linear"
    export(LogisticRegression(max_iter=5000).fit(x, y), x[:32], linear_repo, "lin")
    with (linear_repo / "lin" / "config.pbtxt").open("a") as f:
        f.write(margin)
    with pytest.raises(ModelLoadFailed) as info, running_server(linear_repo):
        pass
    assert "lin/config.pbtxt" in str(info.value) and "parameters['explain_output'] 'margin'" in str(info.value)
