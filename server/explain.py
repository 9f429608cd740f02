"""Per-prediction explanations, served from the ONNX graph itself (request parameter `explain`).

- **Tables** (every input 2-D: scikit-learn models, tabular torch nets, mixed tables):
  interventional Shapley values against the card's reference rows (`reference`: cluster
  centroids or quantile-built rows, never raw training rows). A coalition's value is the model's
  mean output over the reference rows with the coalition's features taken from the request.
  Exact (every coalition) when 2^features x reference rows fits the budget, else KernelSHAP: the
  Shapley-kernel weighted regression over sampled coalitions (sizes drawn by the kernel, each
  paired with its complement), constrained so that the attributions add up exactly to the
  output minus `base_value` (the mean output over the reference rows). The coalitions and the
  regression's solve are made once per model version (seeded): a patient's explanation is the
  same every time it is asked for, and a request pays only for its own rows.
- **Tree ensembles** (a table of one input whose explained output comes from an `ai.onnx.ml`
  TreeEnsemble node over per-feature steps, and is linear in the trees: forests' averaged
  probabilities, every regressor): the same interventional Shapley values, exact, computed from
  the trees themselves (`treeshap.py`, `explain_method` `tree_shap`), in well under a
  millisecond per row on the background threads, with no model rows to run. Gradient-boosted
  classifiers serve a logistic or softmax of the trees' sum, whose Shapley values are no sum
  over trees: they keep the method above, on the probabilities they serve.
- **Images, signals and sequences**: occlusion over segments (image patches, time windows,
  tokens): a segment's attribution is the output drop when it alone is replaced by the
  reference, spread over its elements; `base_value` is the output on the reference.
- **Text** (token ids with an attention mask, from the server's tokenizer or the caller):
  occlusion over about 16 windows of whole words per row, a window removed by masking it out
  (attention mask 0, the id the pad id); a word's sub-word tokens stay together, and tokens of no
  word ([CLS], [SEP]) always stay, with attribution 0; `base_value` is the output with every word
  removed. Token ids sent by the caller carry no words: there each token but the first is one.
  Attributions are per token position of the tokenizer's encoding (a window's drop spread over
  its tokens), 0 on padding (for text the response also lists the tokens: `explain_tokens`).

The perturbed rows ride the model's batcher at background priority (after every caller's
request, never in a caller's batch, and never holding an instance a caller's batch needs: it
starts beside a running part), in parts the cost model expects to run within 8 ms on the CPU
(1 ms on a GPU, where a caller's kernels would queue behind a part's), a few queued at a time,
on threads at the lowest CPU priority. A part may hold more rows than max_batch_size: it runs
there as engine calls of at most max_batch_size rows, in one hand-off (each part costs the
event loop its queueing and hand-off: a forest explanation in parts of 0.25 / 2 / 8 ms took
14 / 5.3 / 3.6 ms of event-loop time; building a table's coalition rows and reducing their
values on the background threads too took it to 2.5 ms). The work is bounded per model:
`explain_max_evaluations` model rows per explained row, `explain_max_rows` explained rows per
request (config parameters).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError

from medserve.protos.wire import numpy_dtype

from .card import ModelCard
from .config import ModelConfig
from .errors import ExecutionError, InvalidInput, ModelLoadFailed
from .onnx_trees import LINEAR, NotTrees, post_transform, read_trees
from .treeshap import TreeShap, path_bits

log = logging.getLogger(__name__)

Evaluate = Callable[[dict[str, np.ndarray]], Awaitable[Mapping[str, np.ndarray]]]
T = TypeVar("T")
Offload = Callable[[Callable[[], T]], Awaitable[T]]
Run = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]  # a version's sessions, called directly
MARGIN = "margin"  # explain_output: a tree-ensemble classifier's score before its logistic / softmax
MARGIN_TRANSFORMS = ("LOGISTIC", "SOFTMAX")
DEFAULT_MAX_EVALUATIONS = 4096
DEFAULT_MAX_ROWS = 8
# Elements of the explained inputs per request: occlusion evaluates SEGMENTS + 1 copies of them
# (a 64 MiB FP32 batch at this bound), and the attributions are as large again per target.
DEFAULT_MAX_ELEMENTS = 1 << 20
RESPONSE_OVERHEAD_BYTES = 64 << 10  # names, shapes and parameters of a response, generously
SEGMENTS = 16  # occlusion: about this many segments per input (a 4 x 4 grid for an image)


async def inline(work: Callable[[], T]) -> T:
    """Run `work` here (the default: no thread to hand it to)."""
    return work()


@dataclass(frozen=True, slots=True)
class Explanation:
    """Attributions per explained input: [rows, targets, *the input's non-batch dims]; the base
    value [rows, targets]; the method and the explained output."""

    attributions: Mapping[str, np.ndarray]
    base_value: np.ndarray
    method: str
    output: str


def _param_int(config: ModelConfig, key: str, default: int) -> int:
    value = config.parameters.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ModelLoadFailed(f"model {config.name!r}: parameters[{key!r}] must be an integer") from None
    if number < 1:
        raise ModelLoadFailed(f"model {config.name!r}: parameters[{key!r}] must be >= 1")
    return number


def _chosen_output(config: ModelConfig, card: ModelCard | None) -> str | None:
    """The `explain_output` the config or the card names, if any."""
    return config.parameters.get("explain_output") or (card.explain_output if card is not None else None)


def explained_output(config: ModelConfig, card: ModelCard | None) -> str | None:
    """The output an explanation is about: the card's or config's `explain_output`, else
    `probabilities`, else the first floating-point output of one value per target."""
    chosen = _chosen_output(config, card)
    names = [t.name for t in config.outputs]
    if chosen is not None and chosen in names:
        return chosen
    if "probabilities" in names:
        return "probabilities"
    return next((t.name for t in config.outputs if t.datatype in ("FP32", "FP64") and len(t.dims) == 1), None)


class Explainer:
    """Explains one model version's predictions; `evaluate` runs perturbed rows through it."""

    def __init__(self, label: str, config: ModelConfig, card: ModelCard | None, evaluate: Evaluate,
                 seed: int = 0, offload: Offload = inline) -> None:
        self._label = label
        self._config = config
        self._evaluate = evaluate
        self._offload = offload  # numpy work of a table's coalitions, off the event loop
        self._seed = seed
        self._designs: dict[tuple[int, int], _Design] = {}  # (features, reference rows) -> coalitions
        self.max_evaluations = _param_int(config, "explain_max_evaluations", DEFAULT_MAX_EVALUATIONS)
        self.max_rows = _param_int(config, "explain_max_rows", DEFAULT_MAX_ROWS)
        self.max_elements = _param_int(config, "explain_max_elements", DEFAULT_MAX_ELEMENTS)
        self.output = explained_output(config, card)
        self._embedding = card is not None and card.task == "embedding" and not _chosen_output(config, card)
        # Parsed and checked against the model's inputs at load (read-only arrays).
        self._reference: Mapping[str, np.ndarray] = (card.reference if card is not None else None) or {}
        inputs = {t.name: t for t in config.graph_inputs or config.inputs}
        # Tables: every input one row of fixed width. Token ids (a variable-length axis) and
        # text are sequences: occlusion over windows of tokens.
        self._tabular = (config.max_batch_size > 0 and config.tokenizer is None
                         and all(len(t.dims) == 1 and t.dims[0] > 0 for t in inputs.values()))
        self._pad = {p.input: p.value for p in config.padding}
        self._trees: TreeShap | None = None  # a tree ensemble read from the graph: exact TreeSHAP
        names = {t.name for t in config.outputs}
        self._margin = _chosen_output(config, card) == MARGIN and MARGIN not in names

    def use_graph(self, model: Path | bytes, run: Run | None = None) -> None:
        """Read a tree ensemble out of the model's ONNX graph (at load, with the version): a table
        of one input whose explained output comes from a TreeEnsemble node over per-feature
        preprocessing is then explained by exact TreeSHAP, when its served output is linear in
        the trees (post_transform NONE: forests' probabilities, regressors). Other models, and
        GBM classifiers (a logistic or softmax of the trees' sum, whose Shapley values are no
        sum over trees), keep KernelSHAP on the served output, unless the config or card names
        `explain_output: margin`: then a GBM classifier's trees are explained in the space they
        add up in, the log-odds (logits) before its logistic (softmax), and a model without
        such trees is refused at load. `run` (the version's sessions) checks the reading on the
        reference rows: the trees must give what onnxruntime serves."""
        trees = self._read_trees(model)
        if trees is not None and run is not None:
            spec = (self._config.graph_inputs or self._config.inputs)[0]
            rows = np.asarray(self._reference[spec.name])[:max(1, self._config.max_batch_size)]
            rows = rows.astype(numpy_dtype(spec.datatype))
            served = _as_targets(run({spec.name: rows})[str(self.output)])
            mine = post_transform(trees.trees.post_transform,
                                  trees.outputs(trees.raw(path_bits(trees.trees, trees.trees.features_of(rows)))))
            if mine is None or mine.shape != served.shape or not np.allclose(mine, served, rtol=1e-5, atol=1e-5):
                log.warning("model %s: the trees read from the graph do not reproduce its output on the reference "
                            "rows; explained with KernelSHAP", self._label)
                trees = None
        if trees is None and self._margin:
            raise ModelLoadFailed(f"model {self._label}: parameters['explain_output'] 'margin' is the trees' summed "
                                  "score of a tree-ensemble classifier before its logistic or softmax, and this "
                                  "model has no such ensemble the server reads")
        self._trees = trees

    def _read_trees(self, model: Path | bytes) -> TreeShap | None:
        inputs = self._config.graph_inputs or self._config.inputs
        if (not self._tabular or self.output is None or len(inputs) != 1 or not isinstance(model, bytes)
                or b"TreeEnsemble" not in model):
            return None
        spec = inputs[0]
        reference = self._reference.get(spec.name)
        if reference is None:
            return None
        try:
            trees = read_trees(model, spec.name, self.output)
        except (NotTrees, DecodeError) as exc:  # not a graph TreeSHAP reads
            log.debug("model %s: explained with KernelSHAP, not TreeSHAP (%s)", self._label, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a graph this reader gets wrong must not stop the load
            log.warning("model %s: its tree ensemble could not be read (%s); explained with KernelSHAP",
                        self._label, type(exc).__name__)
            return None
        margin = self._margin and trees.post_transform in MARGIN_TRANSFORMS
        if (trees.post_transform != LINEAR and not margin) or trees.features > spec.dims[0]:
            return None
        return TreeShap(trees, reference.astype(numpy_dtype(spec.datatype)))

    @property
    def method(self) -> str | None:
        """`tree_shap` where the graph's trees are explained exactly (None: chosen per request)."""
        return "tree_shap" if self._trees is not None else None

    def refuse(self) -> str | None:
        """Why this model cannot be explained (None when it can)."""
        if self._embedding:
            return ("it is an embedding model: its output values are coordinates, not targets to explain "
                    "(the config parameter explain_output names an output to explain anyway)")
        if self.output is None:
            return "it has no output of one value per target to explain"
        if self._config.max_batch_size <= 0:
            return "it does not batch (explanations evaluate many perturbed rows as one batch)"
        if self._tabular and not self._reference:
            return "its model card has no reference rows (re-export it: the exporters add them)"
        return None

    def admit(self, shapes: Mapping[str, tuple[int, ...]], other_bytes: int, max_response_bytes: int | None) -> None:
        """Refuse, from the inputs' shapes alone and before any work, an explanation this model
        cannot give, of too many rows or elements (`explain_max_rows`, `explain_max_elements`),
        or whose response (`other_bytes` for the outputs and tokens, plus the attributions and
        base values) would not fit in `max_response_bytes` (the server's send limit)."""
        why = self.refuse()
        if why is not None:
            raise InvalidInput(f"model {self._label} cannot be explained: {why}")
        if not shapes:
            return
        first = next(iter(shapes.values()))
        rows = first[0] if first else 1
        if rows > self.max_rows:
            raise InvalidInput(f"model {self._label}: explain takes at most {self.max_rows} rows per request "
                               f"(explain_max_rows), got {rows}")
        elements = sum(math.prod(s) for s in shapes.values())
        if elements > self.max_elements:
            raise InvalidInput(f"model {self._label}: explain takes at most {self.max_elements} input elements per "
                               f"request (explain_max_elements), got {elements}")
        spec = next((t for t in self._config.outputs if t.name == self.output), None)
        targets = math.prod(max(1, d) for d in spec.dims) if spec is not None else 1
        if self._tabular:
            attributed = elements
        else:
            target = next((n for n in sorted(shapes) if "mask" not in n), sorted(shapes)[0])
            attributed = math.prod(shapes[target])
        size = other_bytes + 4 * targets * (attributed + rows) + RESPONSE_OVERHEAD_BYTES
        if max_response_bytes is not None and size > max_response_bytes:
            raise InvalidInput(f"model {self._label}: the explanation of this request would take about {size} "
                               f"bytes, over the server's response limit of {max_response_bytes} bytes "
                               "(--max-message-mb); send fewer rows or shorter inputs")
        return

    async def explain(self, inputs: Mapping[str, np.ndarray], output: np.ndarray,
                      words: np.ndarray | None = None) -> Explanation:
        """Attributions for every row of a request; `output` is its explained output; `words`
        (text from the server's tokenizer) the word of each token position, -1 where none."""
        why = self.refuse()
        if why is not None:
            raise InvalidInput(f"model {self._label} cannot be explained: {why}")
        rows = next(iter(inputs.values())).shape[0]
        if rows > self.max_rows:
            raise InvalidInput(f"model {self._label}: explain takes at most {self.max_rows} rows per request "
                               f"(explain_max_rows), got {rows}")
        targets = _as_targets(output)
        if self._trees is not None:
            return await self._tree_shap(self._trees, inputs, targets)
        if self._tabular:
            return await self._shapley(inputs, targets)
        return await self._occlusion(inputs, targets, words)

    # -- tables: Shapley values ------------------------------------------------------------

    async def _tree_shap(self, trees: TreeShap, inputs: Mapping[str, np.ndarray], f_x: np.ndarray) -> Explanation:
        """Exact Shapley values from the trees themselves, on the background threads. The trees'
        own output must be the served one (a check per request, on the output the caller gets
        anyway): if onnxruntime ever computed differently from this reading of the graph, the
        request is explained by KernelSHAP rather than with attributions of another function."""
        ((name, x),) = inputs.items()
        phi, output = await self._offload(lambda: trees.explain(x))
        served = post_transform(trees.trees.post_transform, output)
        if served is None or served.shape != f_x.shape or not np.allclose(served, f_x, rtol=1e-5, atol=1e-5):
            log.warning("model %s: the trees read from the graph do not reproduce the served output", self._label)
            if self._margin:
                raise ExecutionError(f"model {self._label}: its trees' margin does not reproduce its output")
            return await self._shapley(inputs, f_x)
        base = np.broadcast_to(trees.base_value, output.shape).astype(np.float32)
        explained = MARGIN if trees.trees.post_transform != LINEAR else str(self.output)
        return Explanation({name: phi.astype(np.float32)}, base, "tree_shap", explained)

    async def _shapley(self, inputs: Mapping[str, np.ndarray], f_x: np.ndarray) -> Explanation:
        """Building the coalitions' rows (a forest's 4,096 x 30) and reducing their values take
        about 1.3 ms of numpy: on the background threads (`offload`), not the event loop that
        serves every caller."""
        names = sorted(inputs)
        columns, start = {}, 0  # each input's features' positions among all the features
        for n in names:
            columns[n] = list(range(start, start + inputs[n].shape[1]))
            start += inputs[n].shape[1]
        reference = {n: self._reference[n] for n in names}
        m = len(next(iter(reference.values())))
        design = self._design(start, m)
        rows = next(iter(inputs.values())).shape[0]

        def coalitions() -> dict[str, np.ndarray]:
            batch = {}
            for n in names:
                z = design.masks[:, columns[n]]  # [K, F_n]
                x = inputs[n]  # [rows, F_n]
                r = reference[n].astype(x.dtype, copy=False)  # [m, F_n]
                mixed = np.where(z[None, :, None, :], x[:, None, None, :], r[None, None, :, :])  # [rows, K, m, F_n]
                batch[n] = mixed.reshape(-1, x.shape[1])
            return batch

        def attributions(values: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
            v = values.reshape(rows, len(design.masks), m, -1).mean(axis=2)  # [rows, K, targets]
            empty = v[:, 0]  # masks[0] is the empty coalition; the full one is x itself (f_x)
            phi = design.attributions(v, empty, f_x)
            return {n: phi[:, :, c].astype(np.float32) for n, c in columns.items()}, empty.astype(np.float32)

        batch = await self._offload(coalitions)
        values = _as_targets((await self._evaluate(batch))[str(self.output)])
        phi, base = await self._offload(lambda: attributions(values))
        return Explanation(phi, base, design.method, str(self.output))

    def _design(self, count: int, m: int) -> _Design:
        """The coalitions for `count` features against `m` reference rows, made once per shape:
        every one when 2^count x m fits the budget, else a seeded KernelSHAP sample (so the same
        request is always explained the same way, and no request pays for the sampling)."""
        key = (count, m)
        design = self._designs.get(key)
        if design is None:
            if (1 << count) * m <= self.max_evaluations:
                design = _Design.exact(count)
            else:
                rng = np.random.default_rng(self._seed)
                design = _Design.sampled(_sampled_masks(count, max(4, self.max_evaluations // m), rng))
            self._designs[key] = design
        return design

    # -- images, signals, sequences: occlusion ----------------------------------------------

    async def _occlusion(self, inputs: Mapping[str, np.ndarray], f_x: np.ndarray,
                         words: np.ndarray | None) -> Explanation:
        target = next((n for n in sorted(inputs) if "mask" not in n), sorted(inputs)[0])
        if self._is_tokens(inputs, target):
            return await self._token_occlusion(inputs, target, f_x, words)
        x = inputs[target]
        rows = x.shape[0]
        segments = _segments(x.shape[1:])
        batch = await self._offload(lambda: self._replaced_by_baseline(inputs, target, segments))
        drops, base = await self._drops(batch, f_x, len(segments) + 1)

        def spread() -> np.ndarray:
            attribution = np.zeros((rows, f_x.shape[1], *x.shape[1:]), np.float32)
            for s, index in enumerate(segments):
                size = math.prod(len(range(*i.indices(d))) for i, d in zip(index, x.shape[1:], strict=True))
                attribution[(slice(None), slice(None), *index)] = (drops[:, s, :] / size)[
                    (slice(None), slice(None), *([None] * len(index)))]
            return attribution

        return Explanation({target: await self._offload(spread)}, base, "occlusion", str(self.output))

    async def _drops(self, batch: dict[str, np.ndarray], f_x: np.ndarray, variants: int) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate `variants` perturbed copies per row (the last the all-removed one): each
        earlier variant's output drop [rows, S, targets], and the last's output as the base value."""
        values = _as_targets((await self._evaluate(batch))[str(self.output)]).reshape(f_x.shape[0], variants, -1)
        return f_x[:, None, :] - values[:, :-1, :], values[:, -1, :].astype(np.float32)

    async def _token_occlusion(self, inputs: Mapping[str, np.ndarray], target: str, f_x: np.ndarray,
                               words: np.ndarray | None) -> Explanation:
        """Each row's windows of whole words removed in turn (attention mask 0, the id the pad
        id), and a last variant with every word removed. A word's sub-word tokens are never
        split between windows (half a word is no text the model was trained on); tokens of no
        word (the tokenizer's [CLS], [SEP]) always stay and get attribution 0, as does padding.
        Token ids from the caller carry no words: each token but the first is its own."""
        x, mask = inputs[target], inputs["attention_mask"]
        rows, length = x.shape
        if words is None:
            words = np.where(mask != 0, np.arange(length)[None, :], -1)
            words[:, 0] = -1
        windows = [_word_windows(w) for w in words]  # per row: the token positions of each window
        count = max(map(len, windows), default=0) + 1
        ids = np.repeat(x[:, None], count, axis=1)  # [rows, S + 1, length]
        kept = np.repeat(mask[:, None], count, axis=1)
        pad = int(self._pad.get(target, 0))
        for r, row in enumerate(windows):
            for s, positions in enumerate(row):
                ids[r, s, positions], kept[r, s, positions] = pad, 0
        every_word = words >= 0
        ids[:, -1][every_word], kept[:, -1][every_word] = pad, 0
        batch = {n: np.repeat(a, count, axis=0) for n, a in inputs.items()}
        batch[target], batch["attention_mask"] = ids.reshape(-1, length), kept.reshape(-1, length)
        drops, base = await self._drops(batch, f_x, count)
        attribution = np.zeros((rows, f_x.shape[1], length), np.float32)
        for r, row in enumerate(windows):
            for s, positions in enumerate(row):
                attribution[r][:, positions] = (drops[r, s, :] / len(positions))[:, None]
        return Explanation({target: attribution}, base, "occlusion", str(self.output))

    def _replaced_by_baseline(self, inputs: Mapping[str, np.ndarray], target: str,
                              segments: list[tuple[slice, ...]]) -> dict[str, np.ndarray]:
        """Each segment replaced by the baseline in turn, and the last variant all baseline."""
        x = inputs[target]
        baseline = self._baseline(target, x)
        perturbed = np.repeat(x[:, None], len(segments) + 1, axis=1)  # [rows, S + 1, *dims]
        for s, index in enumerate(segments):
            where: tuple[int | slice, ...] = (slice(None), s, *index)
            perturbed[where] = baseline[index]
        perturbed[:, -1] = baseline
        return {n: (perturbed.reshape(-1, *x.shape[1:]) if n == target else np.repeat(a, len(segments) + 1, axis=0))
                for n, a in inputs.items()}

    @staticmethod
    def _is_tokens(inputs: Mapping[str, np.ndarray], target: str) -> bool:
        """Token ids with an attention mask of the same shape (text models)."""
        mask = inputs.get("attention_mask")
        x = inputs[target]
        return x.ndim == 2 and x.dtype.kind in "iu" and mask is not None and mask.shape == x.shape

    def _baseline(self, name: str, x: np.ndarray) -> np.ndarray:
        ref = self._reference.get(name)
        if ref is not None and ref.shape[1:] == x.shape[1:]:
            return ref.mean(axis=0).astype(x.dtype) if ref.dtype.kind == "f" else ref[0].astype(x.dtype)
        return np.zeros(x.shape[1:], x.dtype)


@dataclass(frozen=True, slots=True)
class _Design:
    """A Shapley design: the coalitions (the empty one first) and the linear map from their
    values to the attributions, both fixed per feature count."""

    masks: np.ndarray  # [K, F] bool
    method: str
    operator: np.ndarray  # exact: W [F, K]; sampled: the constrained least-squares solve [F - 1, K - 1]

    @classmethod
    def exact(cls, count: int) -> _Design:
        masks = _all_masks(count)
        return cls(masks, "shapley_exact", _shapley_weights(masks))

    @classmethod
    def sampled(cls, masks: np.ndarray) -> _Design:
        """Constrained least squares (coalitions sampled by the kernel, so equally weighted):
        min sum_k (v_k - empty - z_k . phi)^2 subject to sum(phi) = full - empty; the last
        feature is eliminated with the constraint, leaving beta = (X'X)^-1 X' y."""
        z = masks[1:].astype(np.float64)  # [K - 1, F]
        x = z[:, :-1] - z[:, -1:]
        gram = x.T @ x + 1e-9 * np.eye(z.shape[1] - 1)
        return cls(masks, "kernel_shap", np.linalg.solve(gram, x.T))

    def attributions(self, v: np.ndarray, empty: np.ndarray, full: np.ndarray) -> np.ndarray:
        """phi [rows, targets, F] from the coalitions' values v [rows, K, targets]."""
        if self.method == "shapley_exact":
            return np.einsum("fk,rkt->rtf", self.operator, v)
        last = self.masks[1:, -1].astype(np.float64)  # [K - 1]
        total = full - empty  # [rows, targets]
        y = v[:, 1:] - empty[:, None, :] - last[None, :, None] * total[:, None, :]  # [rows, K - 1, targets]
        beta = np.einsum("gk,rkt->rgt", self.operator, y)  # [rows, F - 1, targets]
        rest = total - beta.sum(axis=1)
        return np.concatenate([beta, rest[:, None, :]], axis=1).transpose(0, 2, 1)


def _sampled_masks(count: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """The empty coalition, then pairs (a coalition and its complement) drawn by the Shapley
    kernel's size distribution."""
    sizes = np.arange(1, count)
    weights = (count - 1) / (sizes * (count - sizes))
    pairs = max(2, (budget - 1) // 2)
    drawn = rng.choice(sizes, size=pairs, p=weights / weights.sum())
    keys = rng.random((pairs, count))  # a uniform subset of each drawn size: its smallest keys
    cut = np.take_along_axis(np.sort(keys, axis=1), drawn[:, None] - 1, axis=1)
    chosen = keys <= cut
    masks = np.zeros((2 * pairs + 1, count), bool)
    masks[1::2], masks[2::2] = chosen, ~chosen
    return masks


def _as_targets(output: np.ndarray) -> np.ndarray:
    """An output as [rows, targets] float64."""
    array = np.asarray(output, np.float64)
    return array.reshape(array.shape[0], -1)


def _all_masks(count: int) -> np.ndarray:
    """Every coalition of `count` features, the empty one first: [2**count, count]."""
    ids = np.arange(1 << count)
    return ((ids[:, None] >> np.arange(count)) & 1).astype(bool)


def _shapley_weights(masks: np.ndarray) -> np.ndarray:
    """W [features, coalitions] with phi = W @ v: +w(|S|-1) where j is in S, -w(|S|) where not,
    w(s) = s! (F - s - 1)! / F!."""
    count = masks.shape[1]
    sizes = masks.sum(axis=1)

    def w(s: np.ndarray) -> np.ndarray:
        s = np.clip(s, 0, count - 1)
        return np.exp([math.lgamma(k + 1) + math.lgamma(count - k) - math.lgamma(count + 1) for k in s])

    inside, outside = w(sizes - 1), w(sizes)
    return np.where(masks.T, inside[None, :], -outside[None, :])


def _word_windows(words: np.ndarray, count: int = SEGMENTS) -> list[np.ndarray]:
    """About `count` windows of consecutive whole words: each window's token positions."""
    units = np.unique(words[words >= 0])
    if not len(units):
        return []
    return [np.flatnonzero(np.isin(words, group)) for group in np.array_split(units, min(count, len(units)))]


def _segments(dims: Sequence[int]) -> list[tuple[slice, ...]]:
    """About SEGMENTS segments of an input's non-batch dims: a grid of patches over the last two
    dims of an image, windows over the last (time or token) dim of signals and sequences."""
    if not dims:
        return [()]
    spatial = 2 if len(dims) >= 3 and min(dims[-2:]) >= 2 else 1
    per_axis = round(SEGMENTS ** (1 / spatial))
    axes = list(range(len(dims) - spatial, len(dims)))
    cuts = []
    for axis in axes:
        n = min(per_axis, dims[axis])
        edges = np.linspace(0, dims[axis], n + 1).round().astype(int)
        cuts.append([slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a])
    grid: list[tuple[slice, ...]] = [()]
    for options in cuts:
        grid = [g + (o,) for g in grid for o in options]
    lead = tuple(slice(None) for _ in range(len(dims) - spatial))
    return [lead + g for g in grid]
