"""The numpy side of ``factorize_conv``: kernels to factor weights and back.

A Conv kernel W has shape (N, C, KH, KW) and computes, on the zero-padded input x,

    y[n, i, j] = sum_{c, p, q} W[n, c, p, q] x[c, i sh + p dh, j sw + q dw]

Spatial form (Kx1 then 1xK). Let ``M[(c, p), (n, q)] = W[n, c, p, q]``, a (C KH, N KW)
matrix, and ``M = A B`` with A (C KH, r), B (r, N KW). Then

    y[n, i, j] = sum_{k, q} B[k, (n, q)] z[k, i, j sw + q dw],
    z[k, i, j'] = sum_{c, p} A[(c, p), k] x[c, i sh + p dh, j']

z is a KHx1 convolution with weight A reshaped to (r, C, KH, 1), carrying the vertical
stride, dilation and pads, and stride 1 horizontally (so z has the input's full width);
y is a 1xKW convolution of z with weight B reshaped to (N, r, 1, KW), carrying the
horizontal ones. z has no bias, so zero columns of x give zero columns of z: padding z
horizontally equals padding x. The rank of M is at most min(C KH, N KW), and the SVD of
M is the best factorization at every rank (Eckart-Young).

Flattened form (Jin et al. 2014, "Flattened convolutional neural networks", in the
general rank-r form of Lebedev et al. 2015): a CP decomposition of the 4-way kernel,

    W[n, c, p, q] ~ sum_k D[n, k] P[c, k] V[p, k] H[q, k]

runs as a 1x1 convolution C -> r (P), a KHx1 depthwise convolution (V), a 1xKW depthwise
convolution (H) and a 1x1 convolution r -> N (D). Jin's layer (one rank-1 filter per
output channel) is the case r = N, D = I. No closed form gives the best rank-r CP (it
may not even exist), so ``cp_als`` fits it by alternating least squares from a
deterministic start: the error it reports is what it reached, not a lower bound. A
kernel that is exactly of that form at rank r is recovered (to the ALS tolerance).
"""

from __future__ import annotations

import numpy as np

ALS_ITERATIONS = 100
# Stop when a sweep improves the relative error by less than this. The error comes from a norm
# identity whose cancellation floors it near 1e-8: exact fits stop there.
ALS_TOLERANCE = 1e-9


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    """M (C KH, N KW) with ``M[(c, p), (n, q)] = w[n, c, p, q]``."""
    n, c, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)


def spatial_weights(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The KHx1 weight (r, C, KH, 1) and the 1xKW weight (N, r, 1, KW) from A and B."""
    n, c, kh, kw = shape
    r = a.shape[1]
    first = a.reshape(c, kh, r).transpose(2, 0, 1)[..., None]
    second = b.reshape(r, n, kw).transpose(1, 0, 2)[:, :, None, :]
    return np.ascontiguousarray(first), np.ascontiguousarray(second)


def pointwise_weights(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two 1x1 weights (r, C, 1, 1) and (N, r, 1, 1) from A (C, r) and B (r, N)."""
    return np.ascontiguousarray(a.T[:, :, None, None]), np.ascontiguousarray(b.T[:, :, None, None])


def cp_full_rank(shape: tuple[int, ...]) -> int:
    """A rank at which a CP decomposition of a kernel of ``shape`` always exists:
    one rank-1 term per entry of all but the largest mode."""
    return int(np.prod(shape) // max(shape))


def cp_reconstruct(factors: tuple[np.ndarray, ...]) -> np.ndarray:
    d, p, v, h = factors
    return np.einsum("nk,ck,pk,qk->ncpq", d, p, v, h, optimize=True)


def cp_als(w: np.ndarray, rank: int, iterations: int = ALS_ITERATIONS) -> tuple[tuple[np.ndarray, ...], float]:
    """Rank-``rank`` CP factors (D, P, V, H) of the 4-way ``w`` and their relative error, after
    at most ``iterations`` ALS sweeps (fewer once a sweep improves the error by < ALS_TOLERANCE)."""
    t = np.asarray(w, dtype=np.float64)
    norm2 = float(np.sum(t * t))
    if norm2 == 0:
        return tuple(np.zeros((dim, rank)) for dim in t.shape), 0.0
    unfolded = [np.ascontiguousarray(np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)) for mode in range(4)]
    factors = _initial_factors(unfolded, rank)
    error = np.inf
    for _ in range(iterations):
        for mode in range(4):
            others = [factors[m] for m in range(4) if m != mode]
            mttkrp = unfolded[mode] @ _khatri_rao(others)
            gram = np.prod([f.T @ f for f in others], axis=0)
            ridge = 1e-12 * max(float(np.trace(gram)), 1e-300) * np.eye(rank)
            # C order: OpenBLAS multiplies by a Fortran-ordered Khatri-Rao product ~50x slower here.
            factors[mode] = np.ascontiguousarray(np.linalg.solve(gram + ridge, mttkrp.T).T)
        # ||T - R||^2 = ||T||^2 - 2 <T, R> + ||R||^2, with <T, R> from the last mode's MTTKRP
        inner = float(np.sum(factors[3] * mttkrp))
        model2 = float(np.sum(np.prod([f.T @ f for f in factors], axis=0)))
        new_error = np.sqrt(max(norm2 - 2 * inner + model2, 0.0) / norm2)
        factors = _balance(factors)
        if error - new_error < ALS_TOLERANCE:
            break
        error = new_error
    final = float(np.linalg.norm(t - cp_reconstruct(factors))) / np.sqrt(norm2)
    return tuple(factors), final


def _khatri_rao(factors: list[np.ndarray]) -> np.ndarray:
    """Column-wise Kronecker product, first factor slowest: matches a C-order unfolding."""
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, out.shape[1])
    return out


def _initial_factors(unfolded: list[np.ndarray], rank: int) -> list[np.ndarray]:
    """Leading singular vectors of each unfolding, completed by fixed pseudo-random columns."""
    rng = np.random.default_rng(0)
    factors = []
    for m in unfolded:
        dim = m.shape[0]
        u = np.linalg.svd(m, full_matrices=False)[0][:, :rank]
        extra = rng.standard_normal((dim, rank - u.shape[1])) / np.sqrt(dim)
        factors.append(np.concatenate([u, extra], axis=1))
    return factors


def _balance(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Give the four columns of every term the same norm (their product is unchanged)."""
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])
    scale = np.prod(norms, axis=0) ** 0.25
    safe = np.where(norms > 0, norms, 1.0)
    return [f / safe[i] * scale for i, f in enumerate(factors)]


def flattened_weights(factors: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Weights of 1x1 C->r (r, C, 1, 1), KHx1 depthwise (r, 1, KH, 1), 1xKW depthwise
    (r, 1, 1, KW) and 1x1 r->N (N, r, 1, 1)."""
    d, p, v, h = factors
    return tuple(np.ascontiguousarray(x) for x in (
        p.T[:, :, None, None], v.T[:, None, :, None], h.T[:, None, None, :], d[:, :, None, None]))
