"""Per-tensor bits and sparsity that meet an accuracy budget, chosen by measured sensitivity.

Candidates. Each packable weight (``policy.packable``) can take ``bits`` in ``SearchConfig.bits``,
``sparsity`` in ``SearchConfig.sparsities``, per tensor or per channel, always with the
k-means' linear initialisation and no Lloyd step: a uniform grid from the smallest to the
largest kept weight. With ``SearchConfig.scaled`` (``onnxopt pack --calibrate`` sets it), also
per tensor on the weight divided by its input-channel multipliers (``packing.scales``, from
the samples' input second moments): the grid is finer where the inputs are large, and the
levels of matrix weights (2-D MatMul/Gemm, 1x1 Conv) are chosen with error feedback through
the inputs' whole second-moment matrix (``packing.feedback``). On
all-MiniLM-L6-v2 at --min-cosine 0.99 that took the file from 7.43x to 7.71x smaller, most
MatMul weights choosing it. The finest grid is 12 bits: at 10 bits FFN2 weights with outliers
still err 5% (the first check, every weight at 10 bits, reached only cosine 0.9921 of the
0.992 needed). Entropy-coded, a uniform grid is the better quantizer: on
all-MiniLM-L6-v2 its relative error times ``2**(bits per weight)`` is 1.21-1.26 where
converged k-means gives 1.25-1.47 (converged k-means spends levels on the dense middle,
which the Huffman code would have made cheap), and the finer grids (9-12 bits) cost only
the levels that are used. Each candidate's error and bytes are estimated without packing
(``policy.candidates``).

Sensitivity. Per tensor and per family of candidates (per channel or not, pruned or not:
their errors differ in structure, e.g. a per-channel grid puts its error on the channels
with the widest range, BERT's outlier features), the tensor alone is packed at the member
whose error is nearest ``probe_error`` and the model run on the first ``probe_samples``
calibration samples; ``(1 - worst output cosine) / e^2`` is its sensitivity ``s``. Errors of
different tensors add close to independently, so a model's cost is predicted as
``sum s e^2`` and, for a predicted-cost limit T, the allocation with the fewest estimated
bytes comes from ``factorize.cheapest_ranks`` (Lagrangian), its leftover cost then spent
greedily (``_fill``).

Checks. T is searched as in ``factorize``: whole models are checked on the calibration
samples against the budget made ``margin`` stricter, T multiplied or divided by 4 until one
passes and one fails, then bisected down to ``resolution``; the passing allocation with the
fewest bytes wins. Error feedback is fitted to the samples its moments come from (on
all-MiniLM-L6-v2 a layer's output error is 2x lower on them, 1.5x on held-out sentences), so
when any weight gets it the samples are split (``factorize.split_samples``): scales and
moments come from one half, sensitivities and checks from the other, and what is checked is
what is written. Otherwise nothing is fitted and every sample is checked; either way the
check is honest for held-out data up to sampling noise, which the margin absorbs. Top-1 is
checked with the packing error amplified (``Scorer``), since a few dozen samples cannot show
a flip rate below 1/n. Runs never rebuild a session: the weights become overridable initializers (graph
inputs too) of one session, and a variant feeds its packed tensors. The first check packs
every tensor at the finest dense candidate (``max(bits)``); if that misses the budget the
search stops and says so (``Search.met`` False, no settings). Only settings that passed a
check are returned.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from onnxopt import runtime, validate
from onnxopt.errors import UserError
from onnxopt.factorize import _stricter, cheapest_ranks, split_samples
from onnxopt.packing import scales, sharing
from onnxopt.packing.pack import quantize_tensor
from onnxopt.packing.policy import FLOAT_TYPES, Policy, TensorSetting, Weight, candidates, packable
from onnxopt.packing.scales import Scale
from onnxopt.sensitivity import count_samples, first_samples
from onnxopt.validate import Budget

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class SearchConfig:
    bits: tuple[int, ...] = (12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2)  # uniform grids (k-means with no Lloyd step)
    sparsities: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    margin: float = 0.8  # the budget checked: cosine >= 1 - margin (1 - C), top-1 likewise
    top1_stress: float = 3.0  # top-1 is checked with the packing error amplified this much (``Scorer``)
    probe_error: float = 0.05  # relative weight error at which each tensor's sensitivity is measured
    probe_samples: int = 16
    estimate_values: int = 1 << 18  # weights per tensor the estimates look at
    max_checks: int = 14
    resolution: float = 1.05  # bisection stops when the failing and passing limits are this close
    min_elements: int = Policy.min_elements  # smaller tensors stay as they are
    scaled: bool = False  # also scaled candidates, from the samples' input moments (``packing.scales``)

    def __post_init__(self) -> None:
        if not self.bits or not all(1 <= b <= sharing.MAX_BITS for b in self.bits):
            raise UserError(f"candidate bits must be between 1 and {sharing.MAX_BITS}, got {self.bits}")
        if not self.sparsities or not all(0 <= s < 1 for s in self.sparsities):
            raise UserError(f"candidate sparsities must be in [0, 1), got {self.sparsities}")
        if not 0 <= self.margin <= 1:
            raise UserError(f"margin must be between 0 and 1, got {self.margin}")
        if self.resolution <= 1:
            raise UserError(f"resolution must be above 1, got {self.resolution}")
        if self.top1_stress < 1:
            raise UserError(f"top-1 stress must be at least 1, got {self.top1_stress}")


@dataclass
class Tensor:
    """A packable weight, its candidates and what was measured about it."""

    name: str
    weight: Weight
    values: np.ndarray  # float32
    settings: list[TensorSetting]
    errors: np.ndarray  # estimated relative weight error per candidate
    sizes: np.ndarray  # estimated packed bytes per candidate
    sensitivity: dict[tuple[bool, bool, bool], float] = field(default_factory=dict)  # by ``_family``
    probes: list[dict] = field(default_factory=list)
    scale: Scale | None = None  # what a scaled setting divides by

    def costs(self) -> np.ndarray:
        """Predicted model cost (1 - cosine) of each candidate."""
        return np.array([self.sensitivity.get(_family(s), 0.0) for s in self.settings]) * self.errors**2

    def to_json(self) -> dict:
        return {"name": self.name, "numel": int(self.values.size), "probes": self.probes}


@dataclass
class Search:
    """What ``search`` chose and the checks that chose it."""

    settings: dict[str, TensorSetting] | None  # None: the budget cannot be met
    budget: Budget  # the stricter budget checked on the calibration samples
    samples: int
    tensors: list[Tensor] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    scales: dict[str, Scale] = field(default_factory=dict)  # for the scaled settings (``pack``'s ``scales``)

    @property
    def met(self) -> bool:
        return self.settings is not None

    def message(self) -> str:
        if self.met:
            return f"{len(self.settings)} tensors packed to meet the {self.budget.describe()}"
        first = self.checks[0] if self.checks else {}
        got = [f"cosine {first['cosine']:.6f}"] if first else []
        if first.get("top1") is not None:
            got.append(f"top-1 {first['top1']:.4f}, {first['stressed_top1']:.4f} estimated from the error amplified")
        return (f"packing cannot meet the {self.budget.describe()} on {self.samples} calibration samples, "
                f"even with every weight at {first.get('bits', '?')} bits" + (f" ({'; '.join(got)})" if got else ""))

    def facts(self) -> dict:
        return {"budget_checked": self.budget.describe(), "met": self.met, "samples": self.samples,
                "seconds": round(self.seconds, 3), "checks": self.checks,
                "tensors": [t.to_json() for t in self.tensors]}


class Score(NamedTuple):
    cosine: float  # worst float output's mean cosine
    top1: float | None  # worst top-1 agreement of 2-D logits; None without such an output
    stressed_top1: float | None  # the same with the packing error amplified (``SearchConfig.top1_stress``)
    passed: bool


class Scorer:
    """One session whose packable weights are overridable inputs, scored against its own float outputs.

    A top-1 budget is checked on the logits with the packing error amplified ``stress`` times,
    ``a + stress (b - a)``: on a few dozen samples a count of flips cannot tell 99% agreement
    from 100%. Near a tie, the fraction of samples whose top-1 flips grows with the error about
    linearly, so the flips at ``stress`` times the error, divided by ``stress``, estimate the
    flip rate with ``stress`` times the events to count (``stressed_top1`` = 1 - that rate).
    On the digits CNN with 64 samples and --min-top1 0.99: plain counting passed a setting with
    99.4% held-out agreement (0.56 points of accuracy lost), this one 100% at 18x.
    """

    def __init__(self, model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Feeds], budget: Budget,
                 stress: float = 1.0):
        open_model = onnx.ModelProto()
        open_model.CopyFrom(model)
        inits = {t.name: t for t in model.graph.initializer}
        listed = {i.name for i in model.graph.input}
        open_model.graph.input.extend(helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims))
                                      for n in names if n not in listed)
        self.sess = runtime.session(open_model)
        self.dtypes = {n: FLOAT_TYPES[inits[n].data_type] for n in names}
        self.budget, self.stress = budget, stress
        self.feeds = list(feeds)
        self.reference = [runtime.run(self.sess, f) for f in self.feeds]
        self.floating = [k for k, v in self.reference[0].items() if np.issubdtype(v.dtype, np.floating)]

    def subset(self, samples: int) -> Scorer:
        """The same session scored on the first ``samples`` samples."""
        other = object.__new__(Scorer)
        other.__dict__.update(self.__dict__)
        other.feeds = first_samples(self.feeds, samples)
        other.reference = [runtime.run(self.sess, f) for f in other.feeds]
        return other

    def score(self, weights: dict[str, np.ndarray]) -> Score:
        """How the model does with ``weights`` fed instead of its own."""
        sess = Overridden(self.sess, {n: np.ascontiguousarray(v, dtype=self.dtypes[n]) for n, v in weights.items()})
        report = validate.compare_runs(self.reference, sess, self.feeds, budget=replace(self.budget, min_top1=None))
        outs = [o for o in report.outputs if o.name in self.floating]
        cosine = min((o.cosine if math.isfinite(o.cosine) else -1.0 for o in outs), default=1.0)
        top1 = min((o.top1 for o in outs if o.top1 is not None), default=None)
        stressed = min((self._stressed(o.name, sess.outputs) for o in outs if o.top1 is not None), default=None)
        passed = report.passed and (self.budget.min_top1 is None or stressed is None or
                                    stressed >= self.budget.min_top1)
        return Score(cosine, top1, stressed, passed)

    def _stressed(self, name: str, outputs: list[dict[str, np.ndarray]]) -> float:
        a = np.concatenate([r[name] for r in self.reference]).astype(np.float64)
        b = np.concatenate([o[name] for o in outputs]).astype(np.float64)
        flips = float(np.mean(np.argmax(a + self.stress * (b - a), axis=1) != np.argmax(a, axis=1)))
        return 1.0 - flips / self.stress


class Overridden:
    """``sess`` with ``weights`` added to every run's inputs: the part of a session ``compare_runs`` uses.
    Keeps what each run returned."""

    def __init__(self, sess, weights: dict[str, np.ndarray]):
        self.sess, self.weights, self.outputs = sess, weights, []

    def get_outputs(self):
        return self.sess.get_outputs()

    def run(self, names, feeds):
        out = self.sess.run(names, {**feeds, **self.weights})
        self.outputs.append(dict(zip(names, out)))
        return out


def search(model: onnx.ModelProto, feeds: Sequence[Feeds], budget: Budget, config: SearchConfig = SearchConfig(),
           *, progress: bool = False) -> Search:
    """Settings meeting ``budget`` (made ``config.margin`` stricter) on ``feeds``; see the module docstring."""
    if not (budget.lossy and (budget.min_cosine is not None or budget.min_top1 is not None)):
        raise UserError("the packing search needs a budget: --min-cosine or --min-top1")
    t0 = time.perf_counter()
    checked = _stricter(budget, config.margin)
    weights = packable(model, config.min_elements)
    fit = check = list(feeds)
    if config.scaled and scales.feedback_sites(model, weights):  # fitted to samples the checks must not see
        fit, check = split_samples(feeds)
    scorer = Scorer(model, list(weights), check, checked, config.top1_stress)
    result = Search(None, checked, count_samples(scorer.feeds))
    runner = _Runner(scorer, result.checks)
    inits = {t.name: t for t in model.graph.initializer}
    result.scales = scales.scales(model, fit, list(weights), feedback=True) if config.scaled else {}
    tensors = []
    for name, (w, _) in tqdm(weights.items(), unit="tensor", desc="packing estimates", disable=not progress):
        values = numpy_helper.to_array(inits[name]).astype(np.float32)
        scale = result.scales.get(name)
        r = None if scale is None else scale.multipliers.reshape([-1 if i == scale.axis else 1
                                                                   for i in range(values.ndim)])
        found = candidates(values, w, config.bits, config.sparsities, config.estimate_values, r)
        tensors.append(Tensor(name, w, values, found.settings, found.errors, found.sizes, scale=scale))
    runner.tensors = {t.name: t for t in tensors}
    top, least = max(config.bits), min(config.sparsities)
    safe = {t.name: min(((size, s) for size, s in zip(t.sizes, t.settings) if s.bits == top and s.sparsity == least),
                        key=lambda pair: pair[0])[1] for t in tensors}  # the finest grid, the smaller of its forms
    if runner.check(safe, bits=top, sparsity=least):
        _measure(tensors, scorer.subset(config.probe_samples), runner, config, progress)
        result.tensors = tensors
        result.settings = _bisect(tensors, runner, checked, config) or safe
    result.seconds = time.perf_counter() - t0
    return result


class _Runner:
    """Whole-model checks of allocations, packing each (tensor, setting) once."""

    def __init__(self, scorer: Scorer, log: list[dict]):
        self.scorer, self.log = scorer, log
        self.tensors: dict[str, Tensor] = {}
        self.cache: dict[tuple[str, TensorSetting], np.ndarray] = {}
        self.results: dict[tuple, bool] = {}

    def packed(self, name: str, setting: TensorSetting) -> np.ndarray:
        key = (name, setting)
        if key not in self.cache:
            t = self.tensors[name]
            axis = t.weight.axis if setting.per_channel else None
            self.cache[key] = quantize_tensor(t.values, setting, axis, name, t.scale).values
        return self.cache[key]

    def check(self, settings: dict[str, TensorSetting], **facts) -> bool:
        key = tuple(sorted(settings.items()))
        if key in self.results:
            return self.results[key]
        cosine, top1, stressed, ok = self.scorer.score({n: self.packed(n, s) for n, s in settings.items()})
        self.results[key] = ok
        self.cache = {(n, s): self.cache[n, s] for n, s in settings.items()}  # memory: one model's worth
        self.log.append({**facts, "cosine": cosine, "top1": top1, "stressed_top1": stressed, "passed": ok,
                         "estimated_bytes": self.estimated_bytes(settings)})
        logger.info("packing check %s: cosine %.6f, %s", facts, cosine, "met" if ok else "missed")
        return ok

    def estimated_bytes(self, settings: dict[str, TensorSetting]) -> int:
        by = self.tensors
        return int(sum(by[n].sizes[by[n].settings.index(s)] for n, s in settings.items() if n in by))


def _family(s: TensorSetting) -> tuple[bool, bool, bool]:
    """Candidates whose errors are alike in structure share a measured sensitivity: per-channel grids
    put the error where the channel scales are (BERT's outlier features), pruning on small weights,
    scaled grids where the inputs are small (and their error is measured in the divided weights)."""
    return s.per_channel, s.sparsity > 0, s.scaled


def _measure(tensors: list[Tensor], probe: Scorer, runner: _Runner, config: SearchConfig, progress: bool) -> None:
    """Each tensor's sensitivity per family: model cost per squared relative weight error, packed alone."""
    for t in tqdm(tensors, unit="tensor", desc="packing sensitivity", disable=not progress):
        for family in sorted({_family(s) for s in t.settings}):
            members = [i for i, s in enumerate(t.settings) if _family(s) == family]
            i = members[int(np.argmin([abs(math.log(max(t.errors[j], 1e-12) / config.probe_error)) for j in members]))]
            cosine = probe.score({t.name: runner.packed(t.name, t.settings[i])}).cosine
            e = float(t.errors[i])
            t.sensitivity[family] = max(1.0 - cosine, 1e-9) / max(e * e, 1e-12)
            t.probes.append({"bits": t.settings[i].bits, "per_channel": family[0], "sparsity": t.settings[i].sparsity,
                             "scaled": family[2], "error": round(e, 6), "cosine": round(cosine, 8)})
            runner.cache.pop((t.name, t.settings[i]), None)


def _allocate(tensors: list[Tensor], limit: float) -> dict[str, TensorSetting]:
    """The candidates with the fewest estimated bytes whose predicted costs sum to at most ``limit``:
    the Lagrangian choice (``cheapest_ranks``), then the cost it leaves under ``limit`` spent by
    ``_fill``. Without the fill, one big step of one tensor (6 to 5 bits of a 12M-weight
    embedding) leaves a gap no limit reaches: on all-MiniLM-L6-v2 the limits 0.008 and 0.0095
    gave 11.59 and 11.05 MB and nothing between."""
    options = [(np.arange(len(t.settings)), t.sizes, t.costs()) for t in tensors]
    choice = _fill(options, cheapest_ranks(options, limit), limit)
    return {t.name: t.settings[i] for t, i in zip(tensors, choice)}


def _fill(options: list[tuple[np.ndarray, np.ndarray, np.ndarray]], choice: list[int], limit: float) -> list[int]:
    """``choice`` with moves to smaller candidates while the summed cost stays within ``limit``, each
    time the move saving the most bytes per cost added (free moves first)."""
    choice = list(choice)
    slack = limit - float(sum(c[i] for (_, _, c), i in zip(options, choice)))
    while True:
        best, best_rate = None, 0.0
        for t, (_, sizes, costs) in enumerate(options):
            saved, added = sizes[choice[t]] - sizes, costs - costs[choice[t]]
            ok = (saved > 0) & (added <= slack)
            if not ok.any():
                continue
            rate = np.where(ok, saved / np.maximum(added, 1e-300), -1.0)
            i = int(np.argmax(rate))
            if rate[i] > best_rate:
                best, best_rate = (t, i), float(rate[i])
        if best is None:
            return choice
        t, i = best
        slack -= max(float(options[t][2][i] - options[t][2][choice[t]]), 0.0)
        choice[t] = i


def _bisect(tensors: list[Tensor], runner: _Runner, checked: Budget, config: SearchConfig
            ) -> dict[str, TensorSetting] | None:
    """The smallest allocation that passed its check, searching the predicted-cost limit (module docstring)."""
    limit = 1.0 - checked.min_cosine if checked.min_cosine is not None else 1e-3
    floor = float(sum(t.costs()[int(np.argmin(t.sizes))] for t in tensors))  # the smallest allocation's cost
    best, passed, failed = None, None, None
    for _ in range(config.max_checks - 1):
        settings = _allocate(tensors, limit)
        ok = runner.check(settings, predicted_cost=limit)
        if ok:
            passed = limit
            if best is None or runner.estimated_bytes(settings) < runner.estimated_bytes(best):
                best = settings
        else:
            failed = limit
        close = passed is not None and failed is not None and failed / passed < config.resolution
        if close or (ok and limit >= floor):
            break
        if passed is None or failed is None:
            limit = limit * 4 if failed is None else limit / 4
        else:
            limit = math.sqrt(passed * failed)
    return best
