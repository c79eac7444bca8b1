"""``onnxopt IN -o OUT --weight-form codebook|sparse``: weights in ONNX-native forms, no decoder needed.

The last graph step, after the lossless passes and any factorization (``fold_constants``
would fold the Gather back into a dense weight). Built on ``packing.native``:

- ``codebook``: each large Conv/Gemm/MatMul weight and Gather table as uint8 indices into a
  float codebook of at most 2^bits values, and ``Gather(codebook, Cast(indices))`` in the
  graph. The file holds one byte per weight whatever the bits (up to 8), so the default is
  8, the finest grid; fewer bits only make the indices compress better (gzip of the file).
  Pruning saves nothing here (a pruned weight is an index too), so ``--sparsity`` is refused.
- ``sparse``: each pruned weight as a COO ``sparse_initializer`` (int64 indices, the kept
  values in float). 12 bytes per kept float32 weight against 4 dense: it shrinks a weight
  only above 2/3 sparsity. The kept values stay float: exact when a weight keeps at most 2^16
  distinct values, else on a 2^16-level grid (``SPARSE_BITS``), so ``--bits`` is refused.

Settings per weight: ``--bits``/``--sparsity`` for every weight, or with ``--calibrate`` and a
budget (``--min-cosine``, ``--min-top1``, for the codebook also ``--max-error``):

- codebook: the most sensitive weights are kept in float until the budget holds on the
  samples, as int8's fallback (``sensitivity.fallback``; each weight's cost measured with it
  alone in codebook form). Fewer bits would not make the file smaller, so bits are not searched;
  the packing search's uniform grids would be the wrong tool too (on all-MiniLM-L6-v2 its
  8-bit per-tensor grid misses cosine 0.99 where 8-bit k-means keeps 0.998).
- sparse: the packing search (``packing.search``) over 0/70/80/90% per weight (it minimises
  the ``.onnxz`` size estimate, which falls with sparsity as the sparse form does); a weight it
  leaves dense stays exactly as it was.

With ``--factorize`` the budget goes to the ranks, so the form takes fixed settings. A weight
the form would not make smaller keeps its float values (the setting is dropped and the form
built again).
"""

from __future__ import annotations

import argparse
import gzip
import math
from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnxopt import cli_pack, data, io, report, sensitivity, validate
from onnxopt.errors import InternalError, UnsupportedModelError, UserError
from onnxopt.packing.pack import quantize_all
from onnxopt.packing.policy import TensorSetting
from onnxopt.packing.search import Overridden, Scorer, SearchConfig
from onnxopt.validate import Budget

FORMS = {"codebook": "gather", "sparse": "sparse"}  # option value -> ``native_model`` form
CODEBOOK_BITS = 8  # uint8 indices hold up to 8 bits
SPARSE_BITS = 16
SPARSE_MIN = 2 / 3  # float32: 12 bytes per kept weight against 4 dense
SPARSE_SEARCH = SearchConfig(bits=(SPARSE_BITS,), sparsities=(0.0, 0.7, 0.8, 0.9))


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ONNX-native weight forms (lossy; any runtime runs them, no decoder)")
    g.add_argument("--weight-form", choices=sorted(FORMS), help="codebook: weights as uint8 indices into a "
                   "codebook plus a Gather in the graph (about 4x smaller); sparse: pruned weights as sparse "
                   "initializers. The last step, after -O1/-O2; not with --int8. With --calibrate and a budget, the "
                   "costliest weights stay float (codebook) or the sparsity is chosen per weight (sparse)")
    g.add_argument("--bits", type=int, metavar="B", help=f"codebook: every weight shared to 2^B values, B <= 8 "
                   f"(default {CODEBOOK_BITS})")
    g.add_argument("--sparsity", type=float, metavar="S", help=f"sparse: prune this fraction of every weight by "
                   f"magnitude (above {SPARSE_MIN:.2f}: below, a sparse initializer is not smaller)")


def check(args, factorizing: bool) -> None:
    """Refuse option combinations that make no sense, before anything is loaded."""
    form = args.weight_form
    if form is None:
        if args.bits is not None or args.sparsity is not None:
            raise UserError("--bits and --sparsity go with --weight-form (onnxopt pack has its own)")
        return
    if args.int8:
        raise UserError("--weight-form and --int8 are two different weight encodings: give one")
    if form == "codebook" and args.sparsity is not None:
        raise UserError("--sparsity saves nothing with --weight-form codebook (a pruned weight is an index too); "
                        "use --weight-form sparse")
    if form == "sparse" and args.bits is not None:
        raise UserError("--bits goes with --weight-form codebook (sparse values stay float)")
    if args.bits is not None and not 1 <= args.bits <= CODEBOOK_BITS:
        raise UserError(f"--bits must be between 1 and {CODEBOOK_BITS} (uint8 indices), got {args.bits}")
    if args.sparsity is not None and not SPARSE_MIN < args.sparsity < 1:
        raise UserError(f"--sparsity must be above {SPARSE_MIN:.3f} (12 bytes per kept float32 weight against 4 "
                        f"dense) and below 1, got {args.sparsity}")
    if not (args.calibrate and not factorizing):
        if form == "sparse" and args.sparsity is None:
            raise UserError("--weight-form sparse needs --sparsity S" + ("" if factorizing else " or --calibrate"))
    elif form == "sparse" and args.sparsity is not None:
        raise UserError("--sparsity sets every weight; --calibrate chooses it per weight: give one")
    elif form == "sparse" and args.min_cosine is None and args.min_top1 is None:
        raise UserError("--weight-form sparse with --calibrate chooses the sparsity per weight to meet --min-cosine "
                        "or --min-top1: give one (or --sparsity, without --calibrate)")
    elif args.min_cosine is None and args.min_top1 is None and args.max_error is None:
        raise UserError("--weight-form codebook with --calibrate keeps weights in float to meet a budget: give "
                        "--min-cosine, --min-top1 or --max-error")


def searching(args, factorizing: bool) -> bool:
    """Whether the sparse form's settings come from the budget search (else from --sparsity)."""
    return bool(args.weight_form == "sparse" and args.calibrate and not factorizing)


@dataclass
class WeightForms:
    model: onnx.ModelProto
    data: bytes | None
    facts: dict
    failure: str | None = None  # why no setting meets the budget (nothing to write)


def apply(args, model: onnx.ModelProto, budget: Budget, factorizing: bool, progress: bool) -> WeightForms:
    """``model`` with its weights in ``args.weight_form``; the facts for the report."""
    form = args.weight_form
    facts: dict = {"form": form, "search": None, "fallback": None}
    floats: dict[str, str] = {}  # weights kept float on purpose, and why
    if form == "codebook":
        bits = CODEBOOK_BITS if args.bits is None else args.bits
        settings, _, _ = cli_pack.choose_settings(model, bits=bits)
        facts["rule"] = f"--bits {bits}"
        if args.calibrate and not factorizing:
            samples = data.load_feeds(args.calibrate, model, limit=args.calibration_samples)
            settings, fb = keep_float(model, settings, samples, budget, f"calibration data {args.calibrate}")
            floats = {c.node: "float (budget)" for c in fb.kept}
            facts["rule"] += f", weights kept in float by sensitivity to meet the {budget.describe()}"
            facts["fallback"] = _fallback_facts(fb)
            if not fb.met:
                return WeightForms(model, None, {**facts, "weights": {}}, f"--weight-form codebook: {fb.message()}")
    elif searching(args, factorizing):
        samples = data.load_feeds(args.calibrate, model, limit=args.calibration_samples)
        settings, found, facts["rule"] = cli_pack.choose_settings(model, samples=samples, budget=budget,
                                                         config=SPARSE_SEARCH, progress=progress)
        facts["search"] = found.facts()
        if settings is None:
            return WeightForms(model, None, {**facts, "weights": {}}, f"--weight-form sparse: {found.message()}")
    else:
        settings, _, _ = cli_pack.choose_settings(model, bits=SPARSE_BITS, sparsity=args.sparsity)
        facts["rule"] = f"--sparsity {args.sparsity:g}"
    if form == "sparse":  # kept values on a fine grid, per tensor: the codebook is not stored
        floats = {k: "float (search)" for k, s in settings.items() if not s.sparsity}
        settings = {k: replace(s, per_channel=False, iters=0) for k, s in settings.items() if s.sparsity}
    out, applied = _build(model, FORMS[form], settings)
    blob = io.serialize(out)
    try:
        io.check_model(out, f"model with --weight-form {form}", data=blob)
    except UnsupportedModelError as e:
        raise InternalError(f"{e} (packing.native produced it)") from e
    facts.update(weights=_weights(model, out, settings, applied, floats), **_sizes(model, out, blob))
    return WeightForms(out, blob, facts)


class _Fed:
    """``sensitivity.fallback``'s view of the codebook form: a variant is the model with some weights
    replaced by their codebook values, fed as inputs of one session (``packing.search.Scorer``)."""

    def __init__(self, model: onnx.ModelProto, values: dict[str, np.ndarray], samples: list[dict],
                 budget: Budget, source: str):
        self.values, self.budget, self.source = values, budget, source
        self.scorer = Scorer(model, list(values), samples, budget)

    def build(self, exclude=()) -> dict[str, np.ndarray]:
        """The codebook values of every weight but ``exclude`` (kept float)."""
        skip = set(exclude)
        return {n: v for n, v in self.values.items() if n not in skip}

    def score(self, weights: dict[str, np.ndarray]) -> sensitivity.Score:
        fed = Overridden(self.scorer.sess, {n: v.astype(self.scorer.dtypes[n]) for n, v in weights.items()})
        report = validate.compare_runs(self.scorer.reference, fed, self.scorer.feeds, source=self.source,
                                       budget=self.budget)
        return sensitivity.score_of(report, self.scorer.floating)


def keep_float(model: onnx.ModelProto, settings: dict[str, TensorSetting], samples: list[dict], budget: Budget,
               source: str) -> tuple[dict[str, TensorSetting], sensitivity.Fallback]:
    """``settings`` without the fewest most sensitive weights that must stay float for ``budget`` to hold
    on ``samples``: as int8's fallback (``sensitivity.fallback``), each weight's cost measured alone."""
    _, _, quantized = quantize_all(model, settings)
    v = _Fed(model, {n: q.values for n, q in quantized.items()}, samples, budget, source)
    full = v.score(v.build())
    ranked = []
    if not full.passed:
        n = sensitivity.count_samples(samples)
        for name, values in v.values.items():
            s = v.score({name: values})
            ranked.append(sensitivity.LayerCost(name, "weight", 1.0 - s.cosine, s.cosine, s.top1, n, s.rel_l2))
        ranked.sort(key=lambda c: -c.cost)
    fb, _ = sensitivity.fallback(v, ranked, full, what="the codebook form", unit="weight")
    kept = {c.node for c in fb.kept}
    return {k: s for k, s in settings.items() if k not in kept}, fb


def _fallback_facts(fb: sensitivity.Fallback) -> dict:
    finite = [{k: (None if isinstance(x, float) and not math.isfinite(x) else x) for k, x in c.items()}
              for c in fb.checks]
    return {"budget": fb.budget.describe(), "met": fb.met, "source": fb.source, "checks": finite,
            "kept_in_float": [{"weight": c.node, "cost": c.cost} for c in fb.kept]}


def _build(model: onnx.ModelProto, form: str, settings: dict[str, TensorSetting]
           ) -> tuple[onnx.ModelProto, set[str]]:
    """The native model and the weights it changed; a weight the form would not make smaller is built
    again without its setting, so that it keeps its float values rather than shared ones."""
    out = cli_pack.native_model(model, form, settings)
    applied = set(settings) - _dense(out)
    if applied != set(settings):
        out = cli_pack.native_model(model, form, {k: s for k, s in settings.items() if k in applied})
    return out, applied


def _dense(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _weights(before: onnx.ModelProto, after: onnx.ModelProto, settings: dict[str, TensorSetting],
             applied: set[str], floats: dict[str, str]) -> dict[str, dict]:
    """Per weight considered: form ("codebook", "sparse" or "float (why)"), bits, sparsity,
    and bytes before and after (its initializers in ``after``), largest first."""
    sizes = {t.name: t.ByteSize() for t in before.graph.initializer}
    sparse = {s.values.name: s.ByteSize() for s in after.graph.sparse_initializer}
    floats = {**{n: "float (not smaller)" for n in settings if n not in applied}, **floats}
    chain_bytes = _chain_bytes(after)
    out = {}
    for name in [*applied, *floats]:
        s = settings.get(name) if name in applied else None
        form = floats.get(name) or ("sparse" if name in sparse else "codebook")
        after_bytes = sparse[name] if name in sparse else chain_bytes(name) if s else sizes[name]
        out[name] = {"form": form, "bits": s.bits if form == "codebook" else None,
                     "per_channel": s.per_channel if form == "codebook" else None,
                     "sparsity": s.sparsity if s else 0.0, "bytes_before": sizes[name], "bytes_after": after_bytes}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes_before"]))


def _chain_bytes(model: onnx.ModelProto):
    """``name -> bytes`` of the initializers the nodes computing ``name`` read (codebook, indices,
    offsets); the graph is indexed once for all weights."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t.ByteSize() for t in model.graph.initializer}

    def size(name: str) -> int:
        seen, todo, total = set(), [name], 0
        while todo:
            x = todo.pop()
            if x in seen:
                continue
            seen.add(x)
            if x in inits:
                total += inits[x]
            elif x in producer:
                todo.extend(producer[x].input)
        return total

    return size


def _sizes(before: onnx.ModelProto, after: onnx.ModelProto, blob: bytes | None) -> dict:
    """Model bytes before and after the step, and what gzip makes of the result (indices of fewer bits
    compress better)."""
    size = len(blob) if blob is not None else after.ByteSize()
    facts = {"model_bytes_before": before.ByteSize(), "model_bytes_after": size,
             "ratio": before.ByteSize() / max(size, 1)}
    if blob is not None:
        facts["gzip_bytes_after"] = len(gzip.compress(blob, 6, mtime=0))
    return facts


def render(f: dict, top: int = 20) -> list[str]:
    """The terminal section: totals, the largest weights, the search."""
    weights = f["weights"]
    changed = sum(1 for w in weights.values() if w["form"] in FORMS)  # the rest: "float (why)"
    out = [f"weight form {f['form']} ({f['rule']}): {changed} of {len(weights)} weights"]
    if "model_bytes_after" in f:
        gz = f", gzip {report._bytes(f['gzip_bytes_after'])}" if "gzip_bytes_after" in f else ""
        out[0] += (f", model {report._bytes(f['model_bytes_before'])} -> {report._bytes(f['model_bytes_after'])} "
                   f"({f['ratio']:.2f}x smaller{gz})")
    rows = [[name[-44:], w["form"], "-" if w["bits"] is None else str(w["bits"]) + ("/ch" if w["per_channel"] else ""),
             f"{100 * w['sparsity']:.0f}%", f"{w['bytes_before']:,}", f"{w['bytes_after']:,}",
             f"{w['bytes_before'] / max(w['bytes_after'], 1):.1f}x"] for name, w in list(weights.items())[:top]]
    if rows:
        out += report._table(["weight", "form", "bits", "pruned", "before", "after", "ratio"], rows)
    if len(weights) > top:
        out.append(f"  ... {len(weights) - top} smaller weights in the JSON report")
    if f.get("search"):
        out += cli_pack.render_search(f["search"])
    fb = f.get("fallback")
    if fb:
        kept = ", ".join(k["weight"] for k in fb["kept_in_float"][:5]) or "none"
        out.append(f"  budget fallback on the {fb['source']}, {fb['budget']}: {'met' if fb['met'] else 'NOT met'} "
                   f"after {len(fb['checks'])} whole-model checks; kept in float: {kept}"
                   + (" ..." if len(fb["kept_in_float"]) > 5 else ""))
    return out
