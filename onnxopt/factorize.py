"""Low-rank factorization of a model's layers, with ranks chosen from measurements.

    layers (factorize_matmul, factorize_conv sites) -> second moments of their inputs on
    the calibration samples -> weighted spectra -> ranks -> rewrite -> check it loads

How ranks are chosen:

- a rule for every layer (``FactorizeConfig``): ``rank_energy``, ``rank_ratio``, else
  ``max_error``: the smallest rank whose relative output error on the calibration
  samples is at most that (the error is exact for data-weighted spectra; without data
  it is the weight's relative error);
- a budget on the model's outputs (``--min-cosine`` / ``--min-top1``), allocated across
  layers by measured sensitivity. Each layer is factorized alone at a probe rank and the
  model's output cost ``1 - cosine`` measured; its sensitivity is that cost over the
  layer's own squared output error there. Errors of different layers add close to
  independently, so the model's cost at ranks r_l is predicted as
  ``sum_l s_l e_l(r_l)^2``. For a predicted cost T the cheapest ranks come from a
  Lagrangian sweep (each layer minimises MACs + lambda s_l e_l(r)^2 on its own; lambda by
  bisection). T itself is searched (doubling, halving, then bisection) with a check of the
  whole model on the calibration samples against the budget made ``margin`` stricter, and
  the passing allocation saving the most MACs wins. A budget that no allocation meets
  leaves every layer as it is.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnxopt import io, runtime, validate
from onnxopt.calibration.moments import second_moments
from onnxopt.config import CalibrationConfig, FactorizeConfig
from onnxopt.errors import InternalError, UnsupportedModelError
from onnxopt.lowrank import LayerFactorization, RankPolicy, Spectrum, spectrum
from onnxopt.passes import factorize_conv as fconv
from onnxopt.passes import factorize_matmul as fmm
from onnxopt.validate import Budget

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
PROBE_ERROR = 0.1  # a layer's sensitivity is measured with it factorized to this output error


Site = fmm.MatMulSite | fconv.ConvSite


def find_sites(graph, convs: bool = True) -> list[Site]:
    """Every layer the factorization passes could rewrite."""
    return fmm.find_sites(graph)[0] + (fconv.find_sites(graph)[0] if convs else [])


def _input(site: Site) -> str:
    return site.node.inputs[0].name


def _axis(site: Site) -> int:
    """The feature axis of the layer's input: channels (1) for a Conv, the last for a MatMul."""
    return 1 if isinstance(site, fconv.ConvSite) else -1


def _spectrum(site: Site, moment) -> Spectrum:
    if isinstance(site, fconv.ConvSite):  # only the 1x1 form is an SVD over input channels
        return spectrum(site.matrix(), moment.matrix if moment is not None and site.form == "svd" else None)
    return spectrum(site.weight, moment.matrix if moment is not None else None)


@dataclass
class Layer:
    """A factorizable layer with what is known about it."""

    site: Site
    spec: Spectrum
    rows: float  # input rows per sample (tokens, pixels): MACs weight
    errors: np.ndarray  # relative output error by rank (0..R), on held-out samples when there are some
    sensitivity: float | None = None
    probe: dict | None = None

    @property
    def label(self) -> str:
        return self.site.label

    def saving_ranks(self, min_saving: float) -> np.ndarray:
        """Ranks that save at least ``min_saving`` of the MACs, ascending."""
        ranks = np.arange(1, self.spec.full_rank + 1)
        macs = np.array([self.site.macs(int(r)) for r in ranks])
        return ranks[macs <= (1 - min_saving) * self.site.full_macs]


@dataclass
class Factorized:
    model: onnx.ModelProto
    data: bytes | None
    layers: list[LayerFactorization]
    rule: str
    allocation: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def facts(self) -> dict:
        done = [x for x in self.layers if x.applied]
        return {
            "rule": self.rule,
            "layers_factorized": len(done),
            "layers_considered": len(self.layers),
            "params_before": sum(x.params_before for x in self.layers),
            "params_after": sum(x.params_after for x in self.layers),
            "layers": [x.to_json() for x in self.layers],
            **({"allocation": self.allocation} if self.allocation else {}),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def factorize_model(model: onnx.ModelProto, feeds: Sequence[Feeds] | None, config: FactorizeConfig = FactorizeConfig(),
                    budget: Budget | None = None, *, progress: bool = False) -> Factorized:
    """``model`` with its MatMul/Gemm and Conv layers factorized (see the module docstring)."""
    t0 = time.perf_counter()
    sites = find_sites(io.to_graph(model), config.convs)
    feeds = list(feeds or [])
    search = bool(feeds) and budget is not None and _lossy(budget)
    # A budget's ranks are chosen with factors fitted on one half of the samples and checked on
    # the other, so the checks see samples the factors never saw (in-sample errors were 2x lower
    # on MiniLM); the factors written are then fitted on all. The per-layer rule measures on all
    # samples: with few samples per feature (digits: 64 images, 1024 features) half the samples
    # fit much worse factors than all of them, so held-out halves would mislead it.
    fit, check = split_samples(feeds) if search else (feeds, [])
    moments = _moments(model, sites, fit, progress)
    held = _moments(model, sites, check, progress)
    seconds = {"measure": time.perf_counter() - t0}
    policy = _policy(config)
    if not search:
        result = _apply(model, _layers(sites, moments), policy, None, flattened=config.flattened)
        result.rule = _describe(config, weighted=bool(moments))
        result.seconds = {**seconds, "total": time.perf_counter() - t0}
        return result
    t = time.perf_counter()
    chosen = _layers(sites, moments, held)
    ranks, allocation = BudgetSearch(model, chosen, check, budget, config, progress=progress).run()
    rule, why = f"budget ({budget.describe()}) by sensitivity", "kept whole: the budget leaves no cheaper rank"
    seconds["allocate"] = time.perf_counter() - t
    layers = _layers(sites, {k: moments[k] + held[k] for k in moments})
    result = _apply(model, layers, policy, ranks)
    held_error = {x.label: x.errors for x in chosen}
    for x in result.layers:  # report the error measured on samples the ranks were not chosen on
        x.error = float(held_error[x.node][x.rank])
    decided = {x.node for x in result.layers}
    result.layers += [_kept(x, why) for x in layers if x.label not in decided]
    result.rule, result.allocation = rule, allocation
    result.seconds = {**seconds, "total": time.perf_counter() - t0}
    return result


def split_samples(feeds: Sequence[Feeds]) -> tuple[list[Feeds], list[Feeds]]:
    """Two disjoint halves of the samples (each batch split along its first axis); ([], feeds[:1])
    style degenerate splits are avoided: with a single sample both halves are that sample."""
    a, b = [], []
    for i, f in enumerate(feeds):
        n = next(iter(f.values())).shape[0] if f and next(iter(f.values())).ndim else 1
        if n >= 2 and all(np.ndim(v) and np.shape(v)[0] == n for v in f.values()):
            a.append({k: v[: n // 2] for k, v in f.items()})
            b.append({k: v[n // 2:] for k, v in f.items()})
        else:
            (a if i % 2 == 0 else b).append(f)
    return (a, b) if a and b else (list(feeds), list(feeds))


def _moments(model: onnx.ModelProto, sites: list[Site], feeds: Sequence[Feeds], progress: bool) -> dict:
    """Input second moments of every layer: the weighting of MatMul and 1x1 Conv spectra, and
    every layer's rows (tokens, input pixels) per sample, which weigh its MACs in allocation."""
    if not feeds or not sites:
        return {}
    return second_moments(model, feeds, {_input(s): _axis(s) for s in sites}, CalibrationConfig(), progress=progress)


def _layers(sites: list[Site], moments: dict, held: dict | None = None) -> list[Layer]:
    out = []
    for s in sites:
        m, h = moments.get(_input(s)), (held or {}).get(_input(s))
        spec = _spectrum(s, m)
        errors = spec.errors_on(h.matrix) if h is not None and spec.weighted else spec.errors()
        out.append(Layer(s, spec, m.rows_per_sample if m else 1.0, errors))
    return out


def _lossy(budget: Budget) -> bool:
    return budget.lossy and (budget.min_cosine is not None or budget.min_top1 is not None)


def _policy(config: FactorizeConfig) -> RankPolicy:
    if config.rank_energy is not None:
        return RankPolicy(energy=config.rank_energy, min_saving=config.min_saving)
    if config.rank_ratio is not None:
        return RankPolicy(ratio=config.rank_ratio, min_saving=config.min_saving)
    return RankPolicy(max_error=config.max_error, min_saving=config.min_saving)


def _describe(config: FactorizeConfig, weighted: bool) -> str:
    if config.rank_energy is not None:
        return f"rank energy {config.rank_energy:g} (weight spectrum{', data-weighted' if weighted else ''})"
    if config.rank_ratio is not None:
        return f"rank ratio {config.rank_ratio:g} of each layer's MACs"
    what = "output error on the calibration samples" if weighted else "weight error (no calibration data)"
    return f"max error {config.max_error:g} ({what})"


def _apply(model: onnx.ModelProto, layers: list[Layer], policy: RankPolicy,
           ranks: dict[str, int] | None, *, graph=None, check: bool = True, flattened: bool = False) -> Factorized:
    """The model with ``ranks`` (or the policy's) applied; ``graph``: an imported copy to reuse
    (gs copies share weights, so a variant costs no weight copy before the export)."""
    graph = io.to_graph(model) if graph is None else graph.copy()
    decisions = []
    for kind, cls in ((fmm.MatMulSite, fmm.FactorizeMatMulPass), (fconv.ConvSite, fconv.FactorizeConvPass)):
        mine = [x for x in layers if isinstance(x.site, kind)]
        part = None if ranks is None else {x.label: ranks[x.label] for x in mine if x.label in ranks}
        if mine and (part is None or part):  # an empty rank map would mean "every layer by the policy"
            extra = {"flattened": flattened} if cls is fconv.FactorizeConvPass else {}
            p = cls(policy, ranks=part, spectra={x.label: x.spec for x in mine}, **extra)
            p(graph)
            decisions += p.layers
    out = io.to_model(graph, like=model)
    data = io.serialize(out)
    if not check:
        return Factorized(out, data, decisions, rule="")
    try:
        io.check_model(out, "factorized model", data=data)
        runtime.session(data if data is not None else out)
    except UnsupportedModelError as e:
        raise InternalError(f"{e} (factorization produced it)") from e
    return Factorized(out, data, decisions, rule="")


def _kept(layer: Layer, reason: str) -> LayerFactorization:
    site = layer.site
    form = site.form if isinstance(site, fconv.ConvSite) else "svd"
    return LayerFactorization(
        node=layer.label, op=site.node.op, form=form, shape=tuple(site.weight.shape), rank=layer.spec.full_rank,
        full_rank=layer.spec.full_rank, macs_before=site.full_macs, macs_after=site.full_macs,
        params_before=site.weight.size, params_after=site.weight.size, error=0.0, weighted=layer.spec.weighted,
        applied=False, reason=reason)


# ---- budget allocation ----


def cheapest_ranks(options: list[tuple[np.ndarray, np.ndarray, np.ndarray]], limit: float) -> list[int]:
    """For each layer, the index into its options minimising total MACs with summed cost <= limit.

    ``options[l]`` = (ranks, macs, cost) arrays; by convention the last option is the
    layer left whole (its cost 0). Lagrangian relaxation: each layer minimises
    ``macs + lam * cost``; the smallest lam meeting the limit is found by bisection.
    """
    def pick(lam: float) -> list[int]:
        return [int(np.argmin(macs + lam * cost)) for _, macs, cost in options]

    def total(choice: list[int]) -> float:
        return float(sum(opt[2][i] for opt, i in zip(options, choice)))

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > limit and hi < 1e30:
        lo, hi = hi, hi * 16
    if total(pick(lo)) <= limit:
        return pick(lo)
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        lo, hi = (lo, mid) if total(pick(mid)) <= limit else (mid, hi)
        if hi / max(lo, 1e-300) < 1 + 1e-6:
            break
    return pick(hi)


class BudgetSearch:
    """Ranks meeting a lossy budget on the calibration samples, by measured sensitivity."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], feeds: Sequence[Feeds], budget: Budget,
                 config: FactorizeConfig, *, progress: bool = False):
        self.model, self.feeds, self.config, self.progress = model, list(feeds), config, progress
        self.layers = [x for x in layers if len(x.saving_ranks(config.min_saving))]
        self.budget = _stricter(budget, config.margin)
        self.graph = io.to_graph(model)
        sess = runtime.session(io.serialize(model) or model)
        self.reference = [runtime.run(sess, f) for f in self.feeds]
        self.floating = [k for k, v in self.reference[0].items() if np.issubdtype(v.dtype, np.floating)]
        self.checks: list[dict] = []

    def score(self, ranks: dict[str, int]) -> tuple[float, bool, float | None]:
        """(worst output cosine, budget met, worst top-1) of the model factorized at ``ranks``."""
        f = _apply(self.model, self.layers, RankPolicy(max_error=0.0, min_saving=0.0), ranks, graph=self.graph,
                   check=False)
        try:  # basic optimizations: a variant is scored once, ORT's layout rewrites would not pay back
            sess = runtime.session(f.data if f.data is not None else f.model,
                                   optimization=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        except UnsupportedModelError as e:
            raise InternalError(f"{e} (a factorized variant)") from e
        report = validate.compare_runs(self.reference, sess, self.feeds, budget=self.budget)
        outs = [o for o in report.outputs if o.name in self.floating]
        cosine = min((o.cosine if math.isfinite(o.cosine) else -1.0 for o in outs), default=1.0)
        top1 = min((o.top1 for o in outs if o.top1 is not None), default=None)
        return cosine, report.passed, top1

    def measure(self) -> None:
        """Each layer's sensitivity: model cost per squared layer error, factorized alone."""
        for x in tqdm(self.layers, unit="layer", desc="factorization sensitivity", disable=not self.progress):
            ranks = x.saving_ranks(self.config.min_saving)
            r = int(ranks[np.argmin(np.abs(x.errors[ranks] - PROBE_ERROR))])
            e = float(x.errors[r])
            cosine, _, _ = self.score({x.label: r})
            x.sensitivity = max(1.0 - cosine, 1e-9) / max(e * e, 1e-12)
            x.probe = {"rank": r, "error": round(e, 6), "cosine": round(cosine, 6)}

    def allocation(self, limit: float) -> dict[str, int]:
        options = []
        for x in self.layers:
            ranks = x.saving_ranks(self.config.min_saving)
            macs = np.array([x.site.macs(int(r)) for r in ranks] + [x.site.full_macs], dtype=np.float64) * x.rows
            cost = np.append(x.sensitivity * x.errors[ranks] ** 2, 0.0)
            options.append((np.append(ranks, 0), macs, cost))
        choice = cheapest_ranks(options, limit)
        return {x.label: int(opt[0][i]) for x, opt, i in zip(self.layers, options, choice) if opt[0][i]}

    def run(self) -> tuple[dict[str, int], dict]:
        if not self.layers:
            return {}, {"checks": [], "layers": []}
        self.measure()
        limit = 1.0 - self.budget.min_cosine if self.budget.min_cosine is not None else 1e-3
        best: dict[str, int] = {}
        passed, failed = None, None  # predicted-cost limits known to pass / fail
        for _ in range(12):
            ranks = self.allocation(limit)
            cosine, ok, top1 = self.score(ranks) if ranks else (1.0, True, None)
            self.checks.append({"predicted_cost": limit, "layers": len(ranks), "cosine": cosine, "top1": top1,
                                "passed": ok, "macs_saved": self._saved(ranks)})
            logger.info("factorization budget: predicted cost %.3g, %d layers: cosine %.6f, %s",
                        limit, len(ranks), cosine, "met" if ok else "missed")
            if ok:
                passed = limit
                if self._saved(ranks) >= self._saved(best):
                    best = ranks
            else:
                failed = limit
            if passed is not None and failed is not None and failed / passed < 1.3:
                break
            if ok and limit >= self._cost_at_smallest_ranks():
                break  # every layer is already at its smallest rank
            limit = (limit * 4 if failed is None else limit / 4) if passed is None or failed is None \
                else math.sqrt(passed * failed)
        return best, {"budget_checked": self.budget.describe(), "checks": self.checks,
                      "sensitivity": [{"node": x.label, "sensitivity": x.sensitivity, "probe": x.probe}
                                      for x in self.layers]}

    def _cost_at_smallest_ranks(self) -> float:
        return float(sum(x.sensitivity * x.errors[int(x.saving_ranks(self.config.min_saving)[0])] ** 2
                         for x in self.layers))

    def _saved(self, ranks: dict[str, int]) -> float:
        by = {x.label: x for x in self.layers}
        return float(sum((by[k].site.full_macs - by[k].site.macs(r)) * by[k].rows for k, r in ranks.items()))


def _stricter(budget: Budget, margin: float) -> Budget:
    cos = None if budget.min_cosine is None else 1.0 - margin * (1.0 - budget.min_cosine)
    top1 = None if budget.min_top1 is None else 1.0 - margin * (1.0 - budget.min_top1)
    return replace(budget, min_cosine=cos, min_top1=top1)
