"""Pruning and k-means weight sharing: hand-checked cases, a loop-form reference Lloyd, exactness and round trips."""

import numpy as np
import pytest

from onnxopt.errors import InternalError, UnsupportedModelError, UserError
from onnxopt.packing.sharing import Init, Shared, _nearest, kmeans_1d, prune, reconstruct, relative_error, share


def reference_kmeans(values, k, iters=1000):
    """Textbook Lloyd in loop form: linear init, nearest centroid (ties to the lower), empty clusters stay put."""
    v = [float(x) for x in np.asarray(values, dtype=np.float32).ravel()]
    lo, hi = min(v), max(v)
    c = [lo + (hi - lo) * j / (k - 1) for j in range(k)] if k > 1 else [lo]

    def nearest(x, cents):
        return min(range(len(cents)), key=lambda j: (abs(x - cents[j]), j))

    assign = None
    for _ in range(iters + 1):
        new = [nearest(x, c) for x in v]
        if new == assign:
            break
        assign = new
        for j in range(k):
            members = [x for x, a in zip(v, assign) if a == j]
            if members:
                c[j] = sum(members) / len(members)
    used = sorted({float(np.float32(c[j])) for j in set(assign)})
    return np.array(used, dtype=np.float32), np.array([nearest(x, used) for x in v])


def assert_bits_equal(a, b):
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


# --- prune ---------------------------------------------------------------------------------------------------


def test_prune_hand_checked_with_tie_to_lower_index():
    w = np.array([0.5, -0.1, 0.0, 0.3, -0.3, 2.0], dtype=np.float32)
    # 3 pruned: the zero, -0.1, then of the tie |0.3| == |-0.3| the lower index
    assert prune(w, 0.5).tolist() == [True, False, False, False, True, True]


@pytest.mark.parametrize(("size", "sparsity", "pruned"), [(10, 0.25, 3), (10, 0.24, 2), (100, 0.29, 29), (7, 1.0, 7)])
def test_prune_count_rounds_half_up(size, sparsity, pruned):
    w = np.arange(1, size + 1, dtype=np.float32)
    keep = prune(w, sparsity)
    assert np.count_nonzero(~keep) == pruned
    assert not keep[:pruned].any() and keep[pruned:].all()


def test_prune_zero_sparsity_keeps_every_nonzero_and_zeros_count_as_pruned():
    w = np.array([[1.0, 0.0, -2.0], [-0.0, 3.0, 4.0]], dtype=np.float32)
    assert prune(w, 0.0).tolist() == [[True, False, True], [False, True, True]]
    assert prune(np.ones((2, 3)), 0.0).all()
    assert prune(w, 1 / 6).tolist() == [[True, False, True], [False, True, True]]  # 1 asked, 2 zeros pruned
    assert prune(w, 0.5).tolist() == [[False, False, True], [False, True, True]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prune_random_keeps_the_largest(sparsity):
    rng = np.random.default_rng(1)
    w = np.round(rng.standard_normal((30, 17)), 1).astype(np.float32)  # rounding makes many ties
    keep = prune(w, sparsity)
    assert keep.shape == w.shape
    assert np.count_nonzero(~keep) == max(int(np.floor(sparsity * w.size + 0.5)), np.count_nonzero(w == 0))
    if keep.any() and (~keep).any():
        assert np.abs(w[~keep]).max() <= np.abs(w[keep]).min()
    np.testing.assert_array_equal(prune(w, sparsity), keep)


def test_prune_rejects_bad_sparsity_and_nan():
    with pytest.raises(UserError):
        prune(np.ones(3), 1.5)
    with pytest.raises(UserError):
        prune(np.ones(3), -0.1)
    with pytest.raises(UnsupportedModelError):
        prune(np.array([1.0, np.nan]), 0.5)
    assert prune(np.zeros((0, 4)), 0.5).shape == (0, 4)


# --- kmeans_1d -----------------------------------------------------------------------------------------------


def test_kmeans_hand_checked_two_clusters():
    c, labels = kmeans_1d(np.array([12, 0, 1, 11, 2, 10], dtype=np.float32), 2)
    assert c.tolist() == [1.0, 11.0]
    assert labels.tolist() == [1, 0, 0, 1, 0, 1]


def test_kmeans_value_on_a_midpoint_goes_to_the_lower_centroid():
    # linear init 0, 4: the midpoint 2 holds the value 2, which joins 0 -> centroids 1 and 4
    c, labels = kmeans_1d(np.array([0, 2, 4], dtype=np.float32), 2)
    assert c.tolist() == [1.0, 4.0] and labels.tolist() == [0, 0, 1]


def test_kmeans_drops_empty_clusters():
    v = np.array([0.0, 0.1, 0.2, 10.0], dtype=np.float32)  # linear init 0, 5, 10: nothing near 5
    c, labels = kmeans_1d(v, 3)
    assert c.tolist() == [np.float32(v[:3].astype(np.float64).mean()), 10.0]
    assert labels.tolist() == [0, 0, 0, 1]


def test_linear_and_density_initialisation():
    v = np.array([0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 100], dtype=np.float32)
    assert kmeans_1d(v, 3, iters=0)[0].tolist() == [0.0, 100.0]  # 0, 50, 100; nothing near 50
    assert kmeans_1d(v, 3, init=Init.DENSITY, iters=0)[0].tolist() == [0.0, 2.0, 100.0]  # quantiles 0, 1/2, 1
    assert kmeans_1d(np.arange(11, dtype=np.float32), 3, iters=0)[0].tolist() == [0.0, 5.0, 10.0]


@pytest.mark.parametrize("k", [7, 8, 300])
def test_kmeans_exact_when_k_covers_the_distinct_values(k):
    rng = np.random.default_rng(2)
    distinct = rng.standard_normal(7).astype(np.float32)
    v = rng.choice(distinct, size=(40, 5))
    c, labels = kmeans_1d(v, k)
    assert_bits_equal(c, np.sort(distinct))
    assert labels.shape == v.shape and labels.dtype == (np.uint8 if k <= 256 else np.uint16)
    assert_bits_equal(c[labels], v)


@pytest.mark.parametrize(("n", "k", "seed"), [(60, 2, 0), (200, 3, 1), (300, 5, 2), (500, 16, 3), (97, 40, 4)])
def test_kmeans_matches_reference_lloyd(n, k, seed):
    rng = np.random.default_rng(seed)
    v = np.concatenate([rng.standard_normal(n // 2), 3 + 0.1 * rng.standard_normal(n - n // 2)]).astype(np.float32)
    rng.shuffle(v)
    c, labels = kmeans_1d(v, k)
    ref_c, ref_labels = reference_kmeans(v, k)
    np.testing.assert_allclose(c, ref_c, rtol=1e-6)
    np.testing.assert_array_equal(labels, ref_labels)


def test_kmeans_is_deterministic_and_order_free():
    rng = np.random.default_rng(5)
    v = rng.standard_normal(20_000).astype(np.float32)  # above the lookup-table threshold
    c, labels = kmeans_1d(v, 64)
    c2, labels2 = kmeans_1d(v.copy(), 64)
    assert c.tobytes() == c2.tobytes() and labels.tobytes() == labels2.tobytes()
    perm = rng.permutation(v.size)
    c3, labels3 = kmeans_1d(v[perm], 64)
    assert c.tobytes() == c3.tobytes()
    np.testing.assert_array_equal(labels3, labels[perm])


@pytest.mark.parametrize("n", [500, 20_000])  # a binary search per value; the lookup table
def test_labels_are_the_nearest_centroid_ties_to_the_lower(n):
    rng = np.random.default_rng(6)
    # centroids 0.008 apart in [-1, 1] and one at 1000: each of the 2**16 bins holds about two midpoints
    c = np.unique(np.concatenate([rng.uniform(-1, 1, 250), [1000.0]]).astype(np.float32))
    mids = (c[:-1].astype(np.float64) + c[1:]) / 2
    ties = mids[mids.astype(np.float32) == mids]  # the midpoints a float32 value can sit on
    assert len(ties) > 50
    v = np.concatenate([rng.uniform(-1.5, 1.5, n), c, ties, [-7.0, 2000.0]]).astype(np.float32)
    labels = _nearest(v, c)
    dist = np.abs(v[:, None].astype(np.float64) - c[None, :])
    np.testing.assert_array_equal(labels, np.argmin(dist, axis=1))  # argmin takes the first (lower) of a tie


@pytest.mark.parametrize("repeat", [1, 5000])
def test_labels_one_ulp_either_side_of_a_midpoint(repeat):
    one, ulp = np.float32(1.0), np.float32(2.0**-23)
    c = np.array([one, one + 3 * ulp], dtype=np.float32)  # midpoint 1 + 1.5 ulp rounds up to 1 + 2 ulp in float32
    v = np.tile(np.array([one, one + ulp, one + 2 * ulp, one + 3 * ulp], dtype=np.float32), repeat)
    assert _nearest(v, c).tolist() == [0, 0, 1, 1] * repeat


def test_kmeans_small_and_empty_inputs():
    assert kmeans_1d(np.array([3.0, 5.0]), 1)[0].tolist() == [4.0]
    c, labels = kmeans_1d(np.zeros(0, dtype=np.float32), 4)
    assert c.shape == (0,) and labels.shape == (0,)
    c, labels = kmeans_1d(np.full(5, 2.5), 4)
    assert c.tolist() == [2.5] and labels.tolist() == [0] * 5


def test_kmeans_rejects_bad_arguments():
    for k in (0, (1 << 16) + 1):
        with pytest.raises(UserError):
            kmeans_1d(np.ones(3), k)
    with pytest.raises(UserError):
        kmeans_1d(np.ones(3), 2, iters=-1)
    with pytest.raises(UnsupportedModelError):
        kmeans_1d(np.array([1.0, np.inf]), 2)


# --- share / reconstruct -------------------------------------------------------------------------------------


def test_pruned_positions_reconstruct_to_positive_zero_and_kept_to_their_centroid():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((16, 9)).astype(np.float32)
    w[0, 0] = -0.0
    mask = prune(w, 0.6)
    for axis in (None, 0):
        s = share(w, 3, axis=axis, mask=mask)
        out = reconstruct(s)
        assert out.dtype == np.float32 and out.shape == w.shape
        assert_bits_equal(out[~mask], np.zeros(np.count_nonzero(~mask)))
        rows = s.codebook if axis is not None else np.broadcast_to(s.codebook, (16, 8))
        assert_bits_equal(out[mask], np.take_along_axis(rows, s.indices.astype(np.intp), axis=1)[mask])
        assert (s.indices[~mask] == 0).all()


def test_per_channel_codebooks_beat_per_tensor_on_channels_of_different_scales():
    rng = np.random.default_rng(8)
    scales = np.array([1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0], dtype=np.float32)
    w = (rng.standard_normal((6, 4, 3, 3)) * scales[:, None, None, None]).astype(np.float32)
    per_channel, per_tensor = reconstruct(share(w, 4, axis=0)), reconstruct(share(w, 4))

    def channel_errors(out):
        return np.linalg.norm((out - w).reshape(6, -1), axis=1) / np.linalg.norm(w.reshape(6, -1), axis=1)

    assert channel_errors(per_channel).max() < 0.15
    assert channel_errors(per_tensor)[:3].min() > 0.9  # the small channels all fall into the centroid near 0
    assert relative_error(w, share(w, 4, axis=0)) < relative_error(w, share(w, 4))


@pytest.mark.parametrize("axis", [1, -1])
def test_share_along_an_inner_axis_equals_kmeans_of_each_slice(axis):
    rng = np.random.default_rng(9)
    w = rng.standard_normal((3, 5, 4)).astype(np.float32)
    s = share(w, 2, axis=axis)
    assert s.codebook.shape == (w.shape[axis], 4) and s.indices.shape == w.shape
    assert s.indices.flags.c_contiguous
    for j in range(w.shape[axis]):
        c, labels = kmeans_1d(np.take(w, j, axis=axis), 4)
        assert_bits_equal(s.codebook[j, : len(c)], c)
        np.testing.assert_array_equal(np.take(s.indices, j, axis=axis), labels)


def test_many_channels_with_a_mask_match_the_reference():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((12, 40)).astype(np.float32)  # more rows than the per-row search path takes
    mask = rng.random(w.shape) < 0.7
    s = share(w, 2, axis=0, mask=mask)
    for r in range(12):
        ref_c, ref_labels = reference_kmeans(w[r][mask[r]], 4)
        np.testing.assert_allclose(s.codebook[r, : len(ref_c)], ref_c, rtol=1e-6)
        np.testing.assert_array_equal(s.indices[r][mask[r]], ref_labels)


def test_rows_with_few_distinct_values_are_exact_beside_rows_that_are_clustered():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((10, 30)).astype(np.float32)
    w[:4] = rng.choice(np.array([-1.5, 0.25, 2.0], dtype=np.float32), size=(4, 30))
    w[4] = np.repeat(np.arange(6, dtype=np.float32), [25, 1, 1, 1, 1, 1])  # 6 values, most samples see 1 or 2
    s = share(w, 2, axis=0)
    out = reconstruct(s)
    assert_bits_equal(out[:4], w[:4])
    for r in range(4, 10):
        ref_c, ref_labels = reference_kmeans(w[r], 4)
        np.testing.assert_allclose(s.codebook[r, : len(ref_c)], ref_c, rtol=1e-6)
        np.testing.assert_array_equal(s.indices[r], ref_labels)


def test_many_channels_send_a_value_on_a_midpoint_to_the_lower_centroid():
    s = share(np.tile(np.array([0.0, 2.0, 4.0], dtype=np.float32), (10, 1)), 1, axis=0)  # the batched search
    assert s.codebook.tolist() == [[1.0, 4.0]] * 10 and s.indices.tolist() == [[0, 0, 1]] * 10


def test_share_is_lossless_with_few_distinct_values_and_pads_the_codebook():
    w = np.array([[0.5, -1.0, 0.5], [-0.0, 2.0, 2.0]], dtype=np.float32)
    s = share(w, 3)
    assert s.codebook.tolist() == [-1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert s.indices.tolist() == [[2, 0, 2], [1, 3, 3]] and s.indices.dtype == np.uint8
    assert_bits_equal(reconstruct(s), w + np.float32(0.0))  # -0.0 comes back as +0.0
    assert relative_error(w, s) == 0.0


def test_share_edge_tensors():
    s = share(np.ones((2, 3), dtype=np.float32), 2, axis=0, mask=np.zeros((2, 3), dtype=bool))
    assert s.codebook.tolist() == [[0.0] * 4] * 2
    assert_bits_equal(reconstruct(s), np.zeros((2, 3)))
    for axis in (0, 1, None):
        assert reconstruct(share(np.zeros((0, 5), dtype=np.float32), 4, axis=axis)).shape == (0, 5)
    assert share(np.ones(3), 9).indices.dtype == np.uint16
    w = np.array([1.0, np.nan, 3.0], dtype=np.float32)
    assert_bits_equal(reconstruct(share(w, 1, mask=~np.isnan(w))), [1.0, 0.0, 3.0])  # NaN pruned is fine
    assert relative_error(np.zeros(4), share(np.zeros(4), 2)) == 0.0


def test_share_is_deterministic():
    w = np.random.default_rng(11).standard_normal((8, 50)).astype(np.float32)
    a, b = share(w, 5, axis=0), share(w.copy(), 5, axis=0)
    assert a.codebook.tobytes() == b.codebook.tobytes() and a.indices.tobytes() == b.indices.tobytes()


def test_share_rejects_bad_arguments():
    w = np.ones((2, 3), dtype=np.float32)
    for bits in (0, 17):
        with pytest.raises(UserError):
            share(w, bits)
    with pytest.raises(UserError):
        share(w, 2, axis=2)
    with pytest.raises(InternalError):
        share(w, 2, mask=np.ones(6, dtype=bool))
    with pytest.raises(UnsupportedModelError):
        share(np.array([1.0, np.nan]), 2)


def test_reconstruct_rejects_inconsistent_input():
    good = share(np.arange(6, dtype=np.float32).reshape(2, 3), 2, axis=0)
    bad = [
        Shared(good.codebook, good.indices + 4, good.mask, 0, 2),  # index past the codebook
        Shared(good.codebook[:, :3], good.indices, good.mask, 0, 2),  # codebook too narrow
        Shared(good.codebook[:1], good.indices, good.mask, 0, 2),  # one codebook for two channels
        Shared(good.codebook, good.indices, good.mask[:1], 0, 2),  # mask of another shape
        Shared(good.codebook.astype(np.float64), good.indices, good.mask, 0, 2),
        Shared(good.codebook, good.indices, good.mask, 5, 2),  # axis out of range
        Shared(good.codebook, good.indices, good.mask, None, 2),  # per-channel codebook, no axis
        Shared(good.codebook, good.indices.astype(np.int8) - 1, good.mask, 0, 2),  # negative index
        Shared(good.codebook, good.indices.astype(np.float32), good.mask, 0, 2),
        Shared(good.codebook, good.indices, good.mask.astype(np.uint8), 0, 2),
    ]
    for s in bad:
        with pytest.raises(UnsupportedModelError):
            reconstruct(s)
