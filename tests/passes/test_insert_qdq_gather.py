"""insert_qdq on Gather tables (embeddings): int8 storage, numerics against onnxruntime.

A quantized table must give, for every gathered value, the float value within half of its
int8 step (per row, per feature or per table, whichever scale it has), with negative
indices too, and exactly the float32 product of DequantizeLinear; onnxruntime's own
optimized graph must gather from the int8 table and dequantize only the gathered rows (a
DequantizeLinear of the whole table, which it does not fold, would run on every inference).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnxopt import runtime
from onnxopt.passes import _qdq_math as qm
from onnxopt.passes._qdq_weights import TableSpec, quantize_table
from onnxopt.passes.insert_qdq import InsertQDQPass, QuantConfig, QuantTarget, plan_quantization
from tests import graphs, numerics
from tests.passes.test_insert_qdq import minmax_ranges, ort_optimized, run_fused

F32 = np.float32
I64 = np.int64
VOCAB, DIM = 50, 16
PER_TENSOR = QuantConfig(per_channel=False)
TRT = QuantConfig(target=QuantTarget.TENSORRT)
DEFAULT = QuantConfig()


def table(seed: int = 0, rows: int = VOCAB, cols: int = DIM) -> np.ndarray:
    """Rows of very different ranges, as in real embeddings (one row holds an outlier)."""
    t = graphs.rand(rows, cols, seed=seed, scale=0.05)
    t[3, 5] = 1.5
    return t


def embedding_model(*, shared: bool = False) -> onnx.ModelProto:
    """word + position embeddings; ``emb`` is a graph output and feeds a MatMul (quantized)."""
    nodes = [helper.make_node("Gather", ["word", "ids"], ["w_rows"], name="word_gather"),
             helper.make_node("Gather", ["word" if shared else "pos", "pos_ids"], ["p_rows"], name="pos_gather"),
             helper.make_node("Add", ["w_rows", "p_rows"], ["emb"], name="add"),
             helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj")]
    inits = [("word", table()), ("w", graphs.rand(DIM, 8, seed=2))] + ([] if shared else [("pos", table(1, 8))])
    return graphs.model(nodes, [("ids", I64, [2, 5]), ("pos_ids", I64, [1, 5])],
                        [("emb", F32, [2, 5, DIM]), ("y", F32, [2, 5, 8])], inits)


def feeds(pos_rows: int = 8) -> dict[str, np.ndarray]:
    ids = np.array([[0, 3, -1, 7, -VOCAB], [49, 3, 3, -2, 10]], I64)  # negative indices count from the end
    return {"ids": ids, "pos_ids": np.array([[0, 1, 2, -1, -pos_rows]], I64)}


def quantize(model: onnx.ModelProto, config: QuantConfig = DEFAULT):
    g = gs.import_onnx(model)
    plan = plan_quantization(g, config)
    ranges = minmax_ranges(model, [feeds()], plan.tensors) if plan.tensors else {}
    return g, InsertQDQPass(ranges, config)(g), plan


def int8_tables(g: gs.Graph) -> dict[str, gs.Constant]:
    return {t.name: t for t in g.tensors().values()
            if isinstance(t, gs.Constant) and t.values.dtype == np.int8 and t.values.ndim == 2
            and t.values.shape[1] == DIM}


def assert_gathers_int8_first(model: onnx.ModelProto) -> None:
    """In onnxruntime's graph, only Gathers read the int8 tables: no whole-table dequantization."""
    opt = ort_optimized(model)
    tables = {i.name for i in opt.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2
              and i.dims[1] == DIM}
    readers = [n.op_type for n in opt.graph.node for x in n.input if x in tables]
    assert tables and set(readers) == {"Gather"}, readers


def model_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def dequantized(t: np.ndarray, axis: int = 0, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(the int8 table dequantized, half of each value's int8 step, the scales' axis)."""
    qt = quantize_table(TableSpec(gs.Constant("t", t), t, axis), per_channel)
    scale = qt.scale if qt.axis is None else qt.scale.reshape([-1 if i == qt.axis else 1 for i in range(t.ndim)])
    return qt.q.astype(F32) * scale, np.broadcast_to(scale / 2 * (1 + 1e-5), t.shape), qt.axis


def gathered(t: np.ndarray, idx: np.ndarray, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """What a quantized Gather(t, idx) must give, and how far from the float rows it may be."""
    deq, half, _ = dequantized(t, 0, per_channel)
    return deq[idx], half[idx]


def run_both(g: gs.Graph, f: dict) -> list[dict[str, np.ndarray]]:
    """The quantized graph as written (every op literally) and as onnxruntime optimizes it."""
    return [numerics.run(g, f), run_fused(g, f)]


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("config", [DEFAULT, PER_TENSOR], ids=["per_channel", "per_tensor"])
def test_tables_within_half_a_step_and_gathered_before_dequantizing(config):
    model = embedding_model()
    g, result, plan = quantize(model, config)
    assert result.stats["quantize_gather_table"] == 2 and result.stats["int8_tables"] == 2
    assert {"word_gather", "pos_gather"} <= set(plan.nodes)
    assert {"word", "pos"}.isdisjoint(t.name for t in g.tensors().values()), "float tables left in the file"
    f = feeds()
    ref = numerics.run(model, f)
    (w, w_half), (p, p_half) = (gathered(table(), f["ids"], config.per_channel),
                                gathered(table(1, 8), f["pos_ids"], config.per_channel))
    for out in run_both(g, f):
        err = np.abs(out["emb"] - ref["emb"])
        assert (err <= w_half + p_half).all() and err.max() > 0, err.max()
        np.testing.assert_array_equal(out["emb"], w + p)  # exactly DequantizeLinear's float32 product
        # the MatMul reading the gathered rows is quantized too: its own int8 steps on top
        y = out["emb"] @ model_weight(model, "w")
        assert np.abs(out["y"] - y).max() <= 4 * (y.max() - y.min()) / 255
    assert_gathers_int8_first(numerics.to_model(g.copy()))


def test_scale_axis_follows_the_outlier():
    """word (50 x 16): the outlier's row is the smaller loss, per-row scales gathered with the ids;
    pos (8 x 16): its column is, per-feature scales broadcast over the gathered rows."""
    assert dequantized(table())[2] == 0 and dequantized(table(1, 8))[2] == 1
    g, _, _ = quantize(embedding_model())
    mul = {n.name: n.outputs[0].outputs[0].outputs[0].outputs[0] for n in g.nodes if n.op == "Gather"
           and n.name in ("word_gather", "pos_gather")}  # Gather -> Cast -> Mul
    assert {m.op for m in mul.values()} == {"Mul"}
    assert mul["word_gather"].inputs[1].inputs[0].op == "Gather"  # the row scales, gathered
    assert mul["pos_gather"].inputs[1].values.shape == (DIM,)
    assert not any(n.op == "DequantizeLinear" and n.inputs[0].inputs and n.inputs[0].inputs[0].op == "Gather"
                   for n in g.nodes)  # no DequantizeLinear(axis=-1): onnxruntime runs it element by element


def test_smaller_reconstruction_error_wins():
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((64, 32)) * np.logspace(-2, 0, 64)[:, None]).astype(F32)  # norms vary by row
    cols = (rng.standard_normal((64, 32)) * np.logspace(-2, 0, 32)).astype(F32)  # ... by feature
    for t, axis in ((rows, 0), (cols, 1)):
        chosen = dequantized(t)[2]
        assert chosen == axis
        assert qm.weight_error(t, chosen) < min(qm.weight_error(t, 1 - chosen), qm.weight_error(t, None))


def test_table_math_zero_column_and_range():
    t = np.zeros((3, 4), F32)
    t[1] = [0.5, -1.0, 0.25, 0.0]
    t[2] = [0.1, 0.0, 0.0, 0.0]
    q = quantize_table(TableSpec(gs.Constant("t", t), t, 0), per_channel=True)
    assert q.axis == 1 and q.q.dtype == np.int8  # per feature: the rows' values are each column's maximum
    np.testing.assert_array_equal(q.q, [[0, 0, 0, 0], [127, -127, 127, 0], [25, 0, 0, 0]])
    np.testing.assert_allclose(q.scale, [0.5 / 127, 1 / 127, 0.25 / 127, qm.MIN_SCALE], rtol=1e-6)
    deq, half, _ = dequantized(t)
    assert (np.abs(deq - t) <= half).all()
    assert qm.weight_error(np.zeros((2, 2), F32), 0) == 0.0
    t1 = quantize_table(TableSpec(gs.Constant("t", t), t, 0), per_channel=False)
    assert t1.axis is None and t1.scale.shape == () and t1.q[1, 1] == -127


def test_shared_table_stored_once():
    model = embedding_model(shared=True)
    g, result, _ = quantize(model)
    assert result.stats["quantize_gather_table"] == 2 and result.stats["int8_tables"] == 1
    assert len(int8_tables(g)) == 1
    f = feeds(VOCAB)
    ref = numerics.run(model, f)
    (w, w_half), (p, p_half) = gathered(table(), f["ids"]), gathered(table(), f["pos_ids"])
    for out in run_both(g, f):
        assert (np.abs(out["emb"] - ref["emb"]) <= w_half + p_half).all()
        np.testing.assert_array_equal(out["emb"], w + p)


@pytest.mark.parametrize("values", ["rows", "features"])
def test_gather_on_the_last_axis(values):
    """Gather(axis=-1) picks columns: per-slice scales then lie along axis 1, per-feature along 0."""
    t = table(rows=DIM, cols=VOCAB)  # (16, 50)
    if values == "features":
        t = t * np.logspace(-2, 0, DIM, dtype=F32)[:, None]
    model = graphs.model([helper.make_node("Gather", ["t", "ids"], ["out"], axis=-1)],
                         [("ids", I64, [2, 5])], [("out", F32, [DIM, 2, 5])], [("t", t)])
    g, result, _ = quantize(model)
    assert result.stats["quantize_gather_table"] == 1
    f = {"ids": feeds()["ids"]}
    deq, half, axis = dequantized(t, 1)
    assert axis == (0 if values == "features" else 1)
    ops = sorted(n.op for n in g.nodes)  # features before the Gather axis: DequantizeLinear(axis=0)
    assert ops == (["DequantizeLinear", "Gather"] if values == "features" else ["Cast", "Gather", "Gather", "Mul"])
    ref = numerics.run(model, f)["out"]
    for out in run_both(g, f):
        err = np.abs(out["out"] - ref)
        assert (err <= np.take(half, f["ids"], axis=1)).all() and err.max() > 0
        np.testing.assert_array_equal(out["out"], np.take(deq, f["ids"], axis=1))


# ---------------------------------------------------------------- left alone


def test_gather_of_an_activation_is_not_a_table():
    model = graphs.model([helper.make_node("Gather", ["x", "ids"], ["y"])],
                         [("x", F32, [VOCAB, DIM]), ("ids", I64, [4])], [("y", F32, [4, DIM])])
    g, result, plan = quantize(model)
    numerics.assert_untouched(model, g, result)
    assert plan.nodes == ()


def test_integer_and_constant_index_tables_left_alone():
    model = graphs.model([helper.make_node("Gather", ["shape", "ids"], ["s"]),
                          helper.make_node("Gather", ["t", "k"], ["y"], name="const_ids")],
                         [("ids", I64, [1])], [("s", I64, [1]), ("y", F32, [2, DIM])],
                         [("shape", np.array([2, 3, 4], I64)), ("t", table()), ("k", np.array([1, 2], I64))])
    g, result, _ = quantize(model)
    numerics.assert_untouched(model, g, result, "constant indices")


def test_table_also_read_by_another_op_stays_float():
    """Tied embeddings: the float table would stay for the MatMul, so an int8 copy only adds."""
    t = table()
    model = graphs.model([helper.make_node("Gather", ["t", "ids"], ["e"], name="g"),
                          helper.make_node("Add", ["e", "e"], ["y"], name="a"),
                          helper.make_node("Transpose", ["t"], ["tt"], name="tr")],
                         [("ids", I64, [2, 5])], [("y", F32, [2, 5, DIM]), ("tt", F32, [DIM, VOCAB])], [("t", t)])
    g, result, _ = quantize(model)
    numerics.assert_untouched(model, g, result, "also read by Transpose 'tr'")


@pytest.mark.parametrize("exclude", ["Gather", "word_gather"])
def test_exclude_keeps_tables_float(exclude):
    model = embedding_model(shared=True)
    g, result, plan = quantize(model, QuantConfig(exclude=(exclude,)))
    assert "quantize_gather_table" not in result.stats and not int8_tables(g)
    assert "word" in {t.name for t in g.tensors().values()}
    reasons = {s.node: s.reason for s in result.skipped}
    assert reasons["word_gather"] == "excluded by the configuration"
    if exclude == "word_gather":  # the other reader of the shared table cannot drop the float table
        assert "also read by Gather 'word_gather'" in reasons["pos_gather"]
    f = feeds(VOCAB)
    ref, out = numerics.run(model, f), numerics.run(g, f)
    np.testing.assert_array_equal(out["emb"], ref["emb"])  # the tables are float: only the MatMul moved


# ---------------------------------------------------------------- TensorRT


def test_tensorrt_dequantizes_the_constant_then_gathers():
    model = embedding_model(shared=True)
    g, result, _ = quantize(model, TRT)
    assert result.stats["int8_tables"] == 1
    dqs = [n for n in g.nodes if n.op == "DequantizeLinear" and n.inputs[0].name in int8_tables(g)]
    assert len(dqs) == 1 and dqs[0].attrs["axis"] == 0  # per row: the outlier's row is the smaller loss
    assert sorted(n.op for n in dqs[0].outputs[0].outputs) == ["Gather", "Gather"]
    f = feeds(VOCAB)
    ref, out = numerics.run(model, f), numerics.run(g, f)
    (w, w_half), (p, p_half) = gathered(table(), f["ids"]), gathered(table(), f["pos_ids"])
    assert (np.abs(out["emb"] - ref["emb"]) <= w_half + p_half).all()
    np.testing.assert_array_equal(out["emb"], w + p)
    runtime.session(numerics.to_model(g.copy()))  # onnxruntime loads it too
