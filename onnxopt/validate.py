"""Run two models side by side in onnxruntime and say how far the outputs moved.

Per output, over every sample: max abs error, relative L2 error ||b-a|| / ||a||,
cosine similarity (mean over samples of the flattened per-sample vectors, and the
worst sample), SQNR in dB (10 log10 of signal over error energy), and top-1
agreement when the output is 2-D logits.

What passes is a ``Budget``. Lossless (the default): every float output has
relative L2 error <= ``rtol`` (or max abs error <= ``atol`` for outputs that are
all but zero) and integer and bool outputs match exactly. Lossy (int8, ...): every
float output keeps mean cosine >= ``min_cosine`` and relative L2 error <=
``max_rel_l2``, and 2-D logits keep top-1 agreement >= ``min_top1``, where given;
without any of them, the numbers are reported and nothing fails.

The report is truthy when it passes (Polygraphy style).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import runtime
from onnxopt.errors import DataError

logger = logging.getLogger(__name__)

LOSSLESS_RTOL = 1e-4
LOSSLESS_ATOL = 1e-5


@dataclass(frozen=True)
class Budget:
    """What a comparison must meet to pass (see the module docstring)."""

    rtol: float = LOSSLESS_RTOL
    atol: float = LOSSLESS_ATOL
    lossy: bool = False
    min_cosine: float | None = None
    min_top1: float | None = None
    max_rel_l2: float | None = None

    @property
    def limits(self) -> bool:
        """Whether a lossy budget sets any limit (without one it only reports)."""
        return self.lossy and any(x is not None for x in (self.min_cosine, self.min_top1, self.max_rel_l2))

    def describe(self) -> str:
        if not self.lossy:
            return f"tolerance: rel L2 <= {self.rtol:g}"
        parts = [f"cosine >= {self.min_cosine}"] if self.min_cosine is not None else []
        parts += [f"top-1 >= {self.min_top1}"] if self.min_top1 is not None else []
        parts += [f"rel L2 <= {self.max_rel_l2}"] if self.max_rel_l2 is not None else []
        return "budget: " + (", ".join(parts) if parts else "none given, report only")

    def passes(self, m: OutputMetrics, floating: bool) -> bool:
        if not self.lossy:
            return m.exact if not floating else m.rel_l2 <= self.rtol or m.max_abs <= self.atol
        if not floating:
            return True
        ok = self.min_cosine is None or m.cosine >= self.min_cosine
        ok = ok and (self.max_rel_l2 is None or m.rel_l2 <= self.max_rel_l2)
        return ok and (self.min_top1 is None or m.top1 is None or m.top1 >= self.min_top1)


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel_l2: float
    cosine: float
    min_cosine: float
    sqnr_db: float
    top1: float | None  # fraction of samples whose argmax agrees; None unless 2-D logits
    exact: bool
    passed: bool

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class ValidationReport:
    outputs: list[OutputMetrics]
    samples: int
    source: str  # "data: path" or "generated inputs"
    budget: Budget = Budget()
    latency_ms: dict[str, float] = field(default_factory=dict)  # "a"/"b" -> median ms

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> list[OutputMetrics]:
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        bad = self.failures()
        if not bad:
            return f"all {len(self.outputs)} outputs pass on {self.samples} samples ({self.budget.describe()})"
        o = bad[0]
        return (f"output {o.name!r} moved: rel L2 {o.rel_l2:.3g}, max abs {o.max_abs:.3g}, cosine {o.cosine:.6f}"
                f" ({self.budget.describe()})")

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "source": self.source,
            "budget": {**asdict(self.budget), "description": self.budget.describe()},
            "latency_ms": self.latency_ms,
            "outputs": {o.name: o.to_json() for o in self.outputs},
        }


def metrics(name: str, a: np.ndarray, b: np.ndarray, budget: Budget = Budget()) -> OutputMetrics:
    """Compare reference ``a`` with candidate ``b`` (first axis = samples)."""
    if a.shape != b.shape:
        nan = float("nan")
        return OutputMetrics(name, a.shape, nan, nan, nan, nan, nan, None, False, False)
    exact = bool(np.array_equal(a, b))
    if not np.issubdtype(a.dtype, np.floating):
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        m = OutputMetrics(name, a.shape, diff, 0.0 if exact else 1.0, 1.0 if exact else 0.0,
                          1.0 if exact else 0.0, math.inf if exact else 0.0, None, exact, False)
        return replace(m, passed=budget.passes(m, floating=False))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    same_nonfinite = bool(np.array_equal(~np.isfinite(a64), ~np.isfinite(b64)))
    a64, b64 = np.where(finite, a64, 0.0), np.where(finite, b64, 0.0)
    err = b64 - a64
    max_abs = float(np.max(np.abs(err))) if err.size else 0.0
    signal, noise = float(np.sum(a64 * a64)), float(np.sum(err * err))
    rel_l2 = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    cos = _cosines(a64, b64)
    top1 = None
    if a.ndim == 2 and a.shape[1] > 1:
        top1 = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    m = OutputMetrics(name, a.shape, max_abs, rel_l2, float(np.mean(cos)) if cos.size else 1.0,
                      float(np.min(cos)) if cos.size else 1.0, sqnr, top1, exact, False)
    return replace(m, passed=same_nonfinite and budget.passes(m, floating=True))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2 = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
    b2 = b.reshape(a2.shape)
    na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
    dot = np.sum(a2 * b2, axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))
    return np.clip(cos, -1.0, 1.0)


def compare(
    a: onnx.ModelProto | bytes | str,
    b: onnx.ModelProto | bytes | str,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    source: str = "generated inputs",
    budget: Budget = Budget(),
    latency_repeat: int = 0,
) -> ValidationReport:
    """Run ``a`` (reference) and ``b`` on every batch of ``feeds`` and compare outputs.

    Each model may be given as a ModelProto, its serialized bytes or a file path.
    """
    sa, sb = runtime.session(a), runtime.session(b)
    report = compare_runs([runtime.run(sa, f) for f in feeds], sb, feeds, source=source, budget=budget)
    if latency_repeat:
        report.latency_ms = {name: latency_ms(s, feeds[0], latency_repeat) for name, s in (("a", sa), ("b", sb))}
    return report


def compare_runs(
    reference: Sequence[dict[str, np.ndarray]],
    sess: ort.InferenceSession,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    source: str = "generated inputs",
    budget: Budget = Budget(),
) -> ValidationReport:
    """Compare outputs already computed for ``feeds`` with what ``sess`` gives on them."""
    names_b = [o.name for o in sess.get_outputs()]
    missing = [n for n in reference[0] if n not in names_b]
    if missing:
        raise DataError(f"second model lacks outputs {missing} of the first; it has {names_b}")
    outs_b = [runtime.run(sess, f) for f in feeds]
    report = ValidationReport([], count_samples(feeds), source, budget)
    for name in reference[0]:
        ra = _stack([o[name] for o in reference])
        rb = _stack([o[name] for o in outs_b])
        report.outputs.append(metrics(name, ra, rb, budget))
    return report


def latency_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], repeat: int) -> float:
    """Median wall time of one run, after two warm-up runs."""
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Join per-batch outputs along the sample axis; keep per-batch shapes apart if they differ."""
    if len(arrays) == 1:
        return arrays[0]
    if all(x.ndim > 0 and x.shape[1:] == arrays[0].shape[1:] for x in arrays):
        return np.concatenate(arrays, axis=0)
    return np.stack([x.ravel() for x in arrays]) if len({x.size for x in arrays}) == 1 else np.concatenate(
        [x.ravel() for x in arrays]
    )[None]


def count_samples(feeds: Sequence[dict[str, np.ndarray]]) -> int:
    """Samples in ``feeds``: each batch's first input's first axis (1 for a scalar or an empty feed)."""
    total = 0
    for f in feeds:
        first = next(iter(f.values()), None)
        total += first.shape[0] if first is not None and first.ndim else 1
    return total
