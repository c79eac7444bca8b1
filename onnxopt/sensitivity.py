"""Which int8 layers cost the most accuracy, and a budget met by keeping the worst in float.

The ranges are calibrated once (``quantize_model``). Every measurement here builds a QDQ
variant of the same float model from those ranges with another exclusion list, runs it in
onnxruntime over the sample feeds (batch by batch, never sample by sample) and compares it
with the float model's outputs (``validate.compare_runs``), with the optimization level the
final validation uses: onnxruntime's fused int8 kernels round differently from Q/DQ run as
float ops. A variant's *cosine* is the worst float output's mean cosine.

The layers are the quantized weight ops (Conv, ConvTranspose, MatMul, Gemm). The ops after
them (Add, Concat, pooling, Reshape, ...) run in int8 only on int8 inputs, so they are never
quantized alone, and keeping a weight layer in float leaves them in float too; a
data-movement op keeps its input's scale and costs nothing of its own. Two methods
(``SensitivityMethod``), each one variant (graph copy, QDQ insertion, session) and one run
over the feeds per layer:

- one at a time (default): only layer L quantized; its cost is ``1 - cosine``. The
  quantization noises of different layers are close to independent, so their energies
  add: the full model's ``1 - cosine`` is about the sum of the layer costs (digits CNN:
  2.9e-5 summed vs 2.3e-5; tiny BERT: 3.9e-4 vs 3.4e-4), and each cost is measured free of
  the other layers' noise, so small costs stay readable;
- drop one: every layer but L quantized; its cost is the cosine gained by leaving L in
  float. It sees interactions, but each gain is the difference of two noisy numbers: on a
  model whose float part amplifies small changes chaotically (a random-weight LSTM) gains
  come out negative.

A variant can need a range the full plan never asked for: with the layer before it in
float, a Conv reading a MaxPool's output needs that output's range, where the full model
ran the MaxPool in int8 on its input's scale. Data-movement ops never leave their input's
range, so ``InheritedRanges`` gives the input's range: the very scale the full model uses,
so a layer alone is measured at the scale it has in the full model.

Past ``screen_above`` layers, every layer is first measured on the first
``screen_samples`` samples and only the ``screen_keep`` costliest again on all of them.

Budget fallback (``fallback``): when the full int8 model misses a lossy budget (cosine,
top-1, relative L2 error: ``validate.Budget``) on the sample feeds, the k costliest layers
are kept in float, k found by doubling (1, 2, 4, ...)
then bisection, each step a check of the whole model against the whole budget: about
2 log2(k) checks. Costs are not exactly additive, so the first k that passes may not be the
smallest, but the model returned always passed its check. Layers are ranked by cosine
whatever the budget: for small errors ``1 - cosine`` is about half the squared relative L2
error, so the ranking serves an L2 budget too. k stops at n - 1 (all but one
layer in float); if that misses too, the budget cannot be met in int8 and the caller
writes nothing.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxopt import io, runtime, validate
from onnxopt.calibration import TensorRange
from onnxopt.config import QuantConfig
from onnxopt.errors import InternalError, UnsupportedModelError
from onnxopt.passes import _qdq_plan as qp
from onnxopt.passes.insert_qdq import PER_CHANNEL_OPSET, InsertQDQPass, ensure_opset, plan_quantization
from onnxopt.quantize import Quantized
from onnxopt.validate import Budget, ValidationReport, count_samples

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


class SensitivityMethod(enum.Enum):
    ONE_AT_A_TIME = "one_at_a_time"  # only the layer quantized: cost = 1 - cosine
    DROP_ONE = "drop_one"  # all but the layer quantized: cost = cosine gained


@dataclass(frozen=True)
class SensitivityConfig:
    method: SensitivityMethod = SensitivityMethod.ONE_AT_A_TIME
    screen_above: int = 48  # more layers than this: screen on a few samples first
    screen_samples: int = 8
    screen_keep: int = 16  # layers measured again on every sample after the screen


@dataclass(frozen=True)
class LayerCost:
    node: str
    op: str
    cost: float  # cosine lost to quantizing this layer (see the method)
    cosine: float  # worst float output's mean cosine of the variant measured
    top1: float | None  # top-1 agreement of that variant where an output is 2-D logits
    samples: int
    rel_l2: float | None = None  # worst float output's relative L2 error of that variant

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    def reason(self, method: SensitivityMethod) -> str:
        if method is SensitivityMethod.ONE_AT_A_TIME:
            return f"sensitivity: costs {self.cost:.3g} cosine (quantized alone)"
        return f"sensitivity: keeping it in float gains {self.cost:.3g} cosine"


class InheritedRanges(Mapping):
    """Calibrated ranges, plus a data-movement op's output taking its input's range."""

    def __init__(self, ranges: Mapping[str, TensorRange], graph: gs.Graph):
        self.ranges = ranges
        self.source = {t.name: n.inputs[0].name for n in graph.nodes if n.op in qp.MOVEMENT_OPS and n.inputs
                       for t in n.outputs if t.name}

    def __getitem__(self, name: str) -> TensorRange:
        seen = set()
        while name not in self.ranges and name in self.source and name not in seen:
            seen.add(name)
            name = self.source[name]
        return self.ranges[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)


@dataclass
class Score:
    cosine: float
    top1: float | None
    report: ValidationReport
    rel_l2: float = 0.0  # the worst float output's

    @property
    def passed(self) -> bool:
        return self.report.passed


class Variants:
    """QDQ variants of one float model from one set of ranges, scored against its float outputs."""

    def __init__(self, model: onnx.ModelProto, ranges: Mapping[str, TensorRange], config: QuantConfig,
                 feeds: Sequence[Feeds], budget: Budget = Budget(lossy=True), source: str = "samples"):
        self.model = ensure_opset(model, PER_CHANNEL_OPSET)
        self.graph = io.to_graph(self.model)
        self.ranges = InheritedRanges(ranges, self.graph)
        self.config, self.budget, self.source = config, budget, source
        self.feeds = list(feeds)
        self.samples = count_samples(self.feeds)
        sess = runtime.session(io.serialize(self.model) or self.model)
        self.reference = [runtime.run(sess, f) for f in self.feeds]
        self.floating = [k for k, v in self.reference[0].items() if np.issubdtype(v.dtype, np.floating)]

    def subset(self, samples: int) -> Variants:
        """The same variants scored on the first ``samples`` samples only."""
        return Variants(self.model, self.ranges.ranges, self.config, first_samples(self.feeds, samples),
                        self.budget, self.source)

    def build(self, exclude: Sequence[str] = ()) -> Quantized:
        """The model quantized with ``exclude`` (planned node labels) kept in float too."""
        graph = self.graph.copy()
        wanted = set(exclude)
        for n in graph.nodes:  # the configuration excludes by node name: name the unnamed
            if not n.name and qp.label(n) in wanted:
                n.name = qp.label(n)
        config = replace(self.config, exclude=(*self.config.exclude, *exclude))
        plan = plan_quantization(graph, config)  # reads the graph only
        result = InsertQDQPass(self.ranges, config)(graph)
        model = io.to_model(graph, like=self.model)
        return Quantized(model, plan, self.ranges.ranges, result, io.serialize(model))

    def score(self, q: Quantized) -> Score:
        try:
            sess = runtime.session(q.data if q.data is not None else q.model)
        except UnsupportedModelError as e:
            raise InternalError(f"{e} (a quantized variant; insert_qdq produced it)") from e
        report = validate.compare_runs(self.reference, sess, self.feeds, source=self.source, budget=self.budget)
        return score_of(report, self.floating)


def score_of(report: ValidationReport, floating: Sequence[str]) -> Score:
    """The worst of the ``floating`` outputs of ``report``: cosine, top-1, relative L2 error."""
    outs = [o for o in report.outputs if o.name in floating]
    cosine = min((o.cosine if math.isfinite(o.cosine) else -1.0 for o in outs), default=1.0)
    top1 = min((o.top1 for o in outs if o.top1 is not None), default=None)
    rel_l2 = max((o.rel_l2 if math.isfinite(o.rel_l2) else math.inf for o in outs), default=0.0)
    return Score(cosine, top1, report, rel_l2)


def first_samples(feeds: Sequence[Feeds], n: int) -> list[Feeds]:
    """The first ``n`` samples of ``feeds`` (inputs' first axis = samples), whole batches kept."""
    out, seen = [], 0
    for f in feeds:
        if seen >= n:
            break
        k = count_samples([f])
        out.append(f if seen + k <= n else {name: v[: n - seen] for name, v in f.items()})
        seen += min(k, n - seen)
    return out


def layers(v: Variants, nodes: Sequence[str]) -> list[tuple[str, str]]:
    """(label, op) of the planned weight layers, in plan order."""
    ops = {qp.label(n): n.op for n in v.graph.nodes}
    return [(name, ops[name]) for name in nodes if ops.get(name) in qp.WEIGHT_OPS]


def measure(v: Variants, nodes: Sequence[str], config: SensitivityConfig = SensitivityConfig(), *,
            progress: bool = False) -> list[LayerCost]:
    """The cost of quantizing each layer among the planned ``nodes``, costliest first."""
    todo = layers(v, nodes)
    if len(todo) > config.screen_above and v.samples > config.screen_samples:
        screen = _measure(v.subset(config.screen_samples), nodes, todo, config.method, progress)
        top = {c.node for c in screen[: config.screen_keep]}
        again = _measure(v, nodes, [x for x in todo if x[0] in top], config.method, progress)
        return again + screen[config.screen_keep:]
    return _measure(v, nodes, todo, config.method, progress)


def _measure(v: Variants, nodes: Sequence[str], todo: list[tuple[str, str]], method: SensitivityMethod,
             progress: bool) -> list[LayerCost]:
    one = method is SensitivityMethod.ONE_AT_A_TIME
    base = 1.0 if one else v.score(v.build()).cosine
    costs = []
    for name, op in tqdm(todo, unit="layer", desc="sensitivity", disable=not progress):
        q = v.build([n for n in nodes if n != name] if one else [name])
        if one and any(s.node == name for s in q.result.skipped):
            logger.info("sensitivity: %s %r cannot be quantized alone; not ranked", op, name)
            continue
        s = v.score(q)
        cost = base - s.cosine if one else s.cosine - base
        costs.append(LayerCost(name, op, cost, s.cosine, s.top1, v.samples, s.rel_l2))
    return sorted(costs, key=lambda c: -c.cost)  # stable: graph order among equal costs


@dataclass
class Fallback:
    """Layers kept in float to meet a budget, and the whole-model checks that chose them."""

    budget: Budget
    source: str = "samples"
    kept: tuple[LayerCost, ...] = ()
    met: bool = True
    checks: list[dict] = field(default_factory=list)  # float_layers, cosine, top1, rel_l2, passed
    what: str = "int8"  # the encoding and what it keeps in float, for messages
    unit: str = "layer"

    def message(self) -> str:
        if self.met:
            return f"{len(self.kept)} {self.unit}s kept in float to meet {self.budget.describe()}"
        best = max(self.checks, key=lambda c: c["cosine"], default=None)
        l2 = f", rel L2 {best['rel_l2']:.4g}" if best and self.budget.max_rel_l2 is not None else ""
        tried = f" (best: {best['float_layers']} {self.unit}s in float, cosine {best['cosine']:.6f}{l2})" if best \
            else ""
        return (f"{self.what} cannot meet the {self.budget.describe()} on the {self.source}, even with all but one "
                f"{self.unit} in float{tried}")


def fallback(v: Variants, ranked: Sequence[LayerCost], full: Score, *, what: str = "int8",
             unit: str = "layer") -> tuple[Fallback, Quantized | None]:
    """Keep the fewest costliest layers in float that make the whole model meet ``v.budget``.

    ``v`` is a ``Variants`` or any other object with its ``budget``, ``source``, ``build(exclude)``
    and ``score(built)`` (``cli_weights`` keeps weights in float with it)."""
    fb = Fallback(v.budget, v.source, what=what, unit=unit)
    fb.checks.append(_check_facts(0, full))
    if full.passed:
        return fb, None
    passing: dict[int, Quantized] = {}  # only the latest model that passed: each can be large

    def ok(k: int) -> bool:
        q = v.build([c.node for c in ranked[:k]])
        s = v.score(q)
        fb.checks.append(_check_facts(k, s))
        logger.info("budget fallback: %d layers in float: cosine %.6f, rel L2 %.4g, %s", k, s.cosine, s.rel_l2,
                    "met" if s.passed else "missed")
        if s.passed:
            passing.clear()
            passing[k] = q
        return s.passed

    lo, hi, limit = 0, 1, len(ranked) - 1  # lo: known to miss (0 is the full model)
    while True:
        if hi > limit:
            fb.met = False
            return fb, None
        if ok(hi):
            break
        lo, hi = hi, (min(2 * hi, limit) if hi < limit else hi + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    fb.kept = tuple(ranked[:hi])
    return fb, passing[hi]


def _check_facts(k: int, s: Score) -> dict:
    return {"float_layers": k, "cosine": s.cosine, "top1": s.top1, "rel_l2": s.rel_l2, "passed": s.passed}


@dataclass
class Tuning:
    """What ``tune`` measured and the model it settled on."""

    quantized: Quantized  # the full int8 model, or the one with layers kept in float
    method: SensitivityMethod
    source: str
    samples: int
    layers: list[LayerCost] | None = None  # costliest first; None when not measured
    fallback: Fallback | None = None  # None when no lossy budget was given
    seconds: float = 0.0  # measuring the layers

    def failure(self) -> str | None:
        """Why no model meets the budget, or None."""
        return None if self.fallback is None or self.fallback.met else self.fallback.message()

    def facts(self) -> dict | None:
        """The report's "sensitivity" section (None when not measured)."""
        if self.layers is None:
            return None
        return {"method": self.method.value, "source": self.source, "samples": self.samples,
                "seconds": round(self.seconds, 3), "layers": [c.to_json() for c in self.layers]}

    def annotate(self, quantization: dict) -> dict:
        """Add the fallback to the report's "quantization" section; say why its layers stayed float."""
        if self.fallback is None:
            return quantization
        fb = self.fallback
        why = {c.node: c.reason(self.method) for c in fb.kept}
        rank = {c.node: i for i, c in enumerate(fb.kept)}
        entries = quantization.get("kept_in_float", [])
        for entry in entries:
            entry["reason"] = why.get(entry["node"], entry["reason"])
        entries.sort(key=lambda e: rank.get(e["node"], len(rank)))  # the fallback's first, costliest first
        quantization["fallback"] = {
            "budget": fb.budget.describe(), "met": fb.met, "source": self.source, "samples": self.samples,
            "kept_in_float": [{"node": c.node, "op": c.op, "cost": c.to_json()["cost"]} for c in fb.kept],
            "checks": [{k: (None if isinstance(x, float) and not math.isfinite(x) else x) for k, x in c.items()}
                       for c in fb.checks],
        }
        return quantization


def has_budget(budget: Budget) -> bool:
    return budget.limits


def tune(model: onnx.ModelProto, q: Quantized, config: QuantConfig, feeds: Sequence[Feeds], budget: Budget, *,
         sensitivity: bool = False, source: str = "samples", options: SensitivityConfig = SensitivityConfig(),
         progress: bool = False) -> Tuning:
    """Measure layer sensitivity (when asked, or needed) and meet ``budget`` on ``feeds``.

    ``model`` is the float model ``q`` was quantized from with ``config`` (its ranges are
    reused). With a lossy budget the full model ``q`` is checked first; only when it misses
    are layers ranked and the costliest kept in float (``fallback``).
    """
    v = Variants(model, q.ranges, config, feeds, budget, source)
    tuning = Tuning(q, options.method, source, v.samples)
    full = v.score(q) if has_budget(budget) else None
    if sensitivity or (full is not None and not full.passed):
        t0 = time.perf_counter()
        tuning.layers = measure(v, q.plan.nodes, options, progress=progress)
        tuning.seconds = time.perf_counter() - t0
    if full is not None:
        tuning.fallback, built = fallback(v, tuning.layers or [], full)
        if built is not None:
            _check(built)
            tuning.quantized = built
    return tuning


def _check(q: Quantized) -> None:
    try:  # as quantize_model: a quantized model that does not load is a bug in insert_qdq
        io.check_model(q.model, "quantized model", data=q.data)
    except UnsupportedModelError as e:
        raise InternalError(f"{e} (insert_qdq produced it)") from e
