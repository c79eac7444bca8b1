"""Low-rank factorization of a weight matrix, optionally weighted by its input's statistics.

A layer ``y = x W`` with ``W`` of shape (K, N) costs K*N multiply-accumulates per input
row; ``y ~ (x A) B`` with A (K, r) and B (r, N) costs r*(K + N), a saving when
``r < K N / (K + N)``.

Weight-only SVD minimises ``||W - A B||_F``: it treats every input direction as equally
likely. The layer's output error on real inputs is what matters:

    E ||x (W - A B)||^2 = tr((W - A B)^T C (W - A B)) = ||S (W - A B)||_F^2

with ``C = E[x^T x]`` (K, K) the inputs' second moment and ``S = C^(1/2)``. By Eckart-Young
on ``S W = U diag(s) V^T`` the best rank r is ``A = S^-1 U_r diag(s_r)^(1/2)``,
``B = diag(s_r)^(1/2) V_r^T`` (the square roots balance the two factors' scales), and
the relative output error at rank r is exactly ``sqrt(sum_{i>r} s_i^2 / sum s_i^2)`` on
the inputs C was measured on. C is damped by a small multiple of its mean diagonal so
that directions the samples never excited (a channel always zero after a ReLU) still
keep their weights on other inputs instead of being discarded for free.

Without C the same formulas hold with S = I: plain SVD, and the "error" is the
relative Frobenius error of the weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

# Added to C, relative to its mean diagonal (see the module docstring).
DAMPING = 1e-3


@dataclass(frozen=True)
class Spectrum:
    """A weight's SVD, weighted by its input's second moment when one was given."""

    left: np.ndarray  # (K, R): S^-1 U diag(s)^(1/2), float64
    right: np.ndarray  # (R, N): diag(s)^(1/2) V^T, float64
    singular: np.ndarray  # (R,) descending
    weighted: bool  # by measured input statistics (the errors are output errors)

    @property
    def full_rank(self) -> int:
        return len(self.singular)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of the best rank-``rank`` approximation, float32."""
        if not 1 <= rank <= self.full_rank:
            raise ValueError(f"rank {rank} outside 1..{self.full_rank}")
        return self.left[:, :rank].astype(np.float32), self.right[:rank].astype(np.float32)

    def errors(self) -> np.ndarray:
        """Relative error at every rank: ``errors()[r]`` for rank r, r = 0..R (R is exact: 0)."""
        energy = self.singular.astype(np.float64) ** 2
        total = energy.sum()
        if total <= 0:
            return np.zeros(self.full_rank + 1)
        tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
        return np.sqrt(np.maximum(tail, 0.0) / total)

    def errors_on(self, second_moment: np.ndarray) -> np.ndarray:
        """Relative output error at every rank (as ``errors()``) on inputs of another second
        moment C2, e.g. samples the factors were not fitted on. With the full factors
        F = A B = W, the error at rank r is D_r = sum_{i>r} a_i b_i, so
        tr(D_r^T C2 D_r) = sum_{i,j>r} (A^T C2 A)_ij (B B^T)_ij: one suffix sum of that
        element-wise product gives every rank at once."""
        c2 = np.asarray(second_moment, dtype=np.float64)
        p = (self.left.T @ c2 @ self.left) * (self.right @ self.right.T)
        tail = np.cumsum(np.cumsum(p[::-1, ::-1], axis=0), axis=1)[::-1, ::-1].diagonal()
        tail = np.append(tail, 0.0)
        return np.sqrt(np.maximum(tail, 0.0) / max(float(tail[0]), 1e-300))

    def energy_rank(self, fraction: float) -> int:
        """The smallest rank keeping ``fraction`` of the squared singular values."""
        energy = self.singular.astype(np.float64) ** 2
        kept = np.cumsum(energy) / max(energy.sum(), 1e-300)
        return int(min(np.searchsorted(kept, fraction - 1e-12) + 1, self.full_rank))

    def error_rank(self, max_error: float) -> int:
        """The smallest rank whose relative error is at most ``max_error``."""
        return int(np.argmax(self.errors() <= max_error))


def spectrum(weight: np.ndarray, second_moment: np.ndarray | None = None, damping: float = DAMPING) -> Spectrum:
    """The (weighted) SVD of ``weight`` (K, N); ``second_moment`` is E[x^T x] of its input, (K, K)."""
    # One BLAS thread: for layer-sized matrices OpenBLAS's thread pool buys little and, when the
    # cores are busy, its spinning threads make a 1536x384 SVD take 4-10 s instead of 0.1 s.
    with threadpool_limits(1, user_api="blas"):
        return _spectrum(weight, second_moment, damping)


def _spectrum(weight: np.ndarray, second_moment: np.ndarray | None, damping: float) -> Spectrum:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    if second_moment is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(s)
        return Spectrum(u * root, root[:, None] * vt, s, weighted=False)
    import scipy.linalg  # here, not at the top: 0.2 s of every onnxopt start that never factorizes

    c = np.asarray(second_moment, dtype=np.float64)
    if c.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"second moment {c.shape} does not match weight {w.shape}")
    c = (c + c.T) / 2
    c[np.diag_indices_from(c)] += damping * max(float(np.mean(np.diag(c))), 1e-12)
    # Any L with L L^T = C serves as S (||L^T D|| = ||C^(1/2) D||): Cholesky is several times
    # cheaper than the eigendecomposition, and damping keeps C positive definite.
    try:
        low = scipy.linalg.cholesky(c, lower=True)
    except np.linalg.LinAlgError:
        lam, q = np.linalg.eigh(c)
        low = q * np.sqrt(np.maximum(lam, lam.max() * 1e-12))  # (q sqrt(lam)) (q sqrt(lam))^T = C
    u, s, vt = np.linalg.svd(low.T @ w, full_matrices=False)
    root = np.sqrt(s)
    left = scipy.linalg.solve_triangular(low.T, u * root, lower=False) if np.allclose(low, np.tril(low)) \
        else np.linalg.solve(low.T, u * root)
    return Spectrum(left, root[:, None] * vt, s, weighted=True)


@dataclass(frozen=True)
class RankPolicy:
    """How a layer's rank is chosen when no rank is given for it. One rule applies:
    ``max_error`` (relative output error, or weight error without data), else ``energy``
    (fraction of squared singular values kept), else ``ratio`` (fraction of MACs kept)."""

    max_error: float | None = None
    energy: float | None = None
    ratio: float | None = None
    # A layer is factorized only when it keeps at most (1 - min_saving) of its MACs:
    # two thin GEMMs run less efficiently than one of the same MACs.
    min_saving: float = 0.2

    def rank(self, spec: Spectrum, macs: Callable[[int], int], full_macs: int) -> int:
        if self.max_error is not None:
            return max(spec.error_rank(self.max_error), 1)
        if self.energy is not None:
            return spec.energy_rank(self.energy)
        if self.ratio is not None:
            return max_rank_within(macs, self.ratio * full_macs, spec.full_rank)
        raise ValueError("a rank policy needs max_error, energy or ratio")

    def saves(self, macs_after: int, full_macs: int) -> bool:
        return macs_after <= (1 - self.min_saving) * full_macs


def max_rank_within(macs: Callable[[int], int], limit: float, full_rank: int) -> int:
    """The largest rank (at least 1) whose MACs are within ``limit``; ``macs`` grows with rank."""
    lo, hi = 1, full_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if macs(mid) <= limit else (lo, mid - 1)
    return lo


@dataclass
class LayerFactorization:
    """What a factorization pass did (or refused) for one layer, for the report."""

    node: str
    op: str
    form: str  # "svd" (Gemm/MatMul, 1x1 conv), "spatial" (KxK as Kx1 then 1xK), "flattened"
    shape: tuple[int, ...]  # the weight's shape
    rank: int
    full_rank: int
    macs_before: int  # per output row / pixel
    macs_after: int
    params_before: int
    params_after: int
    error: float  # relative output error at this rank (weight error when not weighted)
    weighted: bool  # error measured with the input's statistics
    applied: bool = True
    reason: str = ""

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["shape"] = list(self.shape)
        d["error"] = round(float(self.error), 6)
        return d
