"""Fold constant subgraphs into initializers.

Exporters leave computations on constants behind: TorchScript's ``x.view(x.size(0), -1)``
becomes Shape -> Gather -> Unsqueeze -> Concat -> Reshape, paddle2onnx emits Constant
nodes, Casts and Ranges. Three steps, repeated while step 3 folds something (a folded
value can make a shape static that was not):

1. Constant nodes (``value``, ``value_float(s)``, ``value_int(s)``) become initializers,
   so every later pass sees them as ``gs.Constant``. String and sparse values stay nodes.
2. Shape facts (``_shape_inference``): Shape, Size, and Gather/Slice of a Shape, whose
   dims onnx shape inference (with data propagation) proves static, become int64
   constants: ``x.size(1)`` of an ``(N, 3, 8, 8)`` input folds to 3, ``x.size(0)`` stays
   (``simplify_reshape`` turns it into Reshape's 0, "copy this dim", where it can).
3. Constant regions: every node whose inputs are all constant (initializers or outputs
   of such nodes) is evaluated, the whole region in one onnxruntime session with graph
   optimizations off, so each value is exactly what ORT's CPU kernel computes (dtype
   and rank included: an int64 0-d scalar stays one). The values that nodes outside
   the region read, and graph outputs, become initializers of the same name (a graph
   output may be an initializer: the checker and ORT accept it).

Size rule: a folded tensor is stored only if it has at most ``fold_size_limit`` bytes,
or at most as many bytes as the largest initializer it is computed from that nothing
but the folded nodes reads (that one disappears, so the file does not grow).
Transposing a big weight folds, unless another node also reads the weight;
ConstantOfShape/Expand/Tile of a scalar into millions of elements does not fold, nor
does a float16 weight cast to float32. A node that inference shows to be over that
bound is not even evaluated; a node whose value is refused after evaluation stays,
and its own constant inputs are folded instead.

Left as they are: nondeterministic ops (Random*, Multinomial, Bernoulli, training-mode
Dropout), non-standard domains, nodes with subgraphs, DequantizeLinear (folding it
would turn int8 QDQ weights back into float), values numpy cannot hold (strings,
bfloat16; sequences only as intermediate values) and nodes onnxruntime fails to
evaluate. Those are found from ORT's error (the node it names leaves the region with
what depends on it, and the rest runs again) or, when the error names no node, by
evaluating node by node. What a user may want to know is reported in ``skipped``;
no refusal is an error.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxopt import runtime
from onnxopt.config import OptimizeConfig
from onnxopt.graph_utils import const_value, finish, has_subgraph, is_standard
from onnxopt.pass_base import GraphPass, PassResult, Skip
from onnxopt.passes import _shape_inference as si

logger = logging.getLogger(__name__)

NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
NOT_FOLDED = frozenset({"Constant", "DequantizeLinear"})  # left silently (see the docstring)
MAX_ROUNDS = 4
MAX_RETRIES = 16  # sessions on the whole region before going node by node
_NODE_NAME = "__onnxopt_fold_{}__"
_NODE_NAME_RE = re.compile(r"__onnxopt_fold_(\d+)__")
_ORT_LOCATION_RE = re.compile(r"\S*onnxruntime_src/\S+\s+(?:[\w:~<>]+\([^)]*\)\s*)?")


class FoldConstantsPass(GraphPass):
    """Constant nodes to initializers, static shapes to constants, constant regions evaluated.

    stats: ``constant_nodes_to_initializers``; ``shapes_folded`` (Shape, Size, Gather or
    Slice values taken from static dims); ``folded_nodes`` (nodes removed by evaluation).
    """

    name = "fold_constants"

    def __init__(self, size_limit: int = OptimizeConfig.fold_size_limit):
        self.size_limit = size_limit

    @classmethod
    def from_config(cls, config: OptimizeConfig) -> FoldConstantsPass:
        return cls(config.fold_size_limit)

    def call(self, graph: gs.Graph) -> PassResult:
        stats: Counter[str] = Counter()
        skipped: dict[Skip, None] = {}  # ordered set: a node refused in every round is reported once
        refused: set[int] = set()  # ids of nodes evaluated and refused: not evaluated again next round
        stats["constant_nodes_to_initializers"] = _constant_nodes_to_initializers(graph)
        if stats["constant_nodes_to_initializers"]:
            finish(graph)
        for _ in range(MAX_ROUNDS):
            infos = si.infer(graph)
            shapes = _fold_shapes(graph, infos)
            if shapes:
                finish(graph)
            region = _Region(graph, infos, self.size_limit, refused)
            folded = region.fold()
            refused |= region.refused
            skipped.update(dict.fromkeys(region.skipped))
            stats["shapes_folded"] += shapes
            stats["folded_nodes"] += folded
            logger.debug("fold_constants round: %d shape values, %d nodes folded", shapes, folded)
            if not folded:
                break
            finish(graph)
        stats = +stats  # drop zero counts: stats is truthy exactly when the graph changed
        return PassResult(graph, bool(stats), dict(stats), tuple(skipped))


def _constant_node_value(node: gs.Node) -> np.ndarray | LazyValues | None:
    if node.op != "Constant" or not is_standard(node) or node.inputs or len(node.outputs) != 1:
        return None
    if len(node.attrs) != 1:
        return None  # gs drops sparse_value, leaving none
    key, v = next(iter(node.attrs.items()))
    if key == "value" and _usable(v) and si.elem_type(v) != onnx.TensorProto.STRING:
        if not isinstance(v._values, LazyValues):
            return v._values
        # A lazy copy of the proto: exotic dtypes (bfloat16, float8) pass through bit-exactly,
        # and exporting (which renames it) leaves the caller's model untouched.
        proto = onnx.TensorProto()
        proto.CopyFrom(v._values.tensor)
        return LazyValues(proto)
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
             "value_ints": np.int64}
    return np.array(v, kinds[key]) if key in kinds else None


def _constant_nodes_to_initializers(graph: gs.Graph) -> int:
    converted = [(node, v) for node in graph.nodes if (v := _constant_node_value(node)) is not None]
    for node, values in converted:
        out = node.outputs[0]
        node.outputs.clear()
        out.to_constant(values)
    return len(converted)


def _fold_shapes(graph: gs.Graph, infos: dict[str, si.TensorInfo]) -> int:
    folds = si.shape_folds(graph, infos)
    for node, value in folds:
        out = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        out.to_constant(value)
    return len(folds)


class _Region:
    """The nodes computable from constants alone, their values, and what to store."""

    def __init__(self, graph: gs.Graph, infos: dict[str, si.TensorInfo], limit: int, exclude: set[int]):
        self.graph, self.infos, self.limit = graph, infos, limit
        self.skipped: list[Skip] = []
        self.refused: set[int] = set()  # ids of the nodes evaluated but not folded
        self.nodes: list[gs.Node] = []
        self.source: dict[str, int] = {}  # tensor -> bytes of the largest private initializer behind it
        self.uncertain: set[int] = set()  # ids of nodes whose output sizes inference left open
        candidates = self._candidates(exclude)
        ids, outputs = {id(n) for n in candidates}, {id(t) for t in graph.outputs}

        def private_bytes(t: gs.Constant) -> int:
            # Only an initializer nothing else reads disappears when its readers fold.
            return int(t._values.nbytes) if id(t) not in outputs and all(id(c) in ids for c in t.outputs) else 0

        for node in candidates:
            ins = [t for t in node.inputs if t.name]
            if all(_usable(t) or t.name in self.source for t in ins):  # else an input was too big
                sizes = [self.source[t.name] if t.name in self.source else private_bytes(t) for t in ins]
                self._consider(node, max(sizes, default=0))

    def _candidates(self, exclude: set[int]) -> list[gs.Node]:
        """Nodes computable from initializers by operators that may be evaluated, in order."""
        reachable: set[str] = set()
        found = []
        for node in self.graph.nodes:
            ins = [t for t in node.inputs if t.name]
            if not node.outputs or id(node) in exclude or not all(_usable(t) or t.name in reachable for t in ins):
                continue
            reason = self._refusal(node)
            if reason is None:
                found.append(node)
                reachable.update(o.name for o in node.outputs if o.name)
            elif reason:
                self.skipped.append(Skip(_label(node), node.op, reason))
        return found

    def _refusal(self, node: gs.Node) -> str | None:
        """Why ``node`` is not evaluated ("" to say nothing), or None."""
        if not is_standard(node):
            return f"operator of domain {node.domain!r}: cannot evaluate it"
        if has_subgraph(node):
            return "has a subgraph"
        if node.op in NONDETERMINISTIC:
            return "nondeterministic operator"
        if node.op in NOT_FOLDED:
            return ""
        if node.op == "Dropout" and len(node.inputs) == 3 and node.inputs[2].name:
            training = const_value(node.inputs[2])
            if training is None or training.any():
                return "nondeterministic operator (training-mode Dropout)"
        infos = [self.infos.get(o.name) for o in node.outputs if o.name]
        # numpy cannot hold these (bfloat16, float8, int4, strings); sequences may be interior values
        if any(i is not None and i.elem_type not in si.STORABLE | {0, si.NOT_A_TENSOR} for i in infos):
            return "output type cannot be stored as an initializer"
        return None

    def _consider(self, node: gs.Node, biggest: int) -> None:
        """Admit ``node`` unless inference shows an output over the size bound."""
        sizes = [i.nbytes if i else None for i in (self.infos.get(o.name) for o in node.outputs if o.name)]
        if None in sizes:
            self.uncertain.add(id(node))
        largest = max((s for s in sizes if s is not None), default=0)
        if largest > max(self.limit, biggest):
            self.skipped.append(Skip(_label(node), node.op, _too_big(largest, self.limit)))
            return
        self.nodes.append(node)
        self.source.update((o.name, biggest) for o in node.outputs if o.name)

    def fold(self) -> int:
        """Evaluate, store the values read from outside, detach the folded nodes; count them."""
        if not self.nodes:
            return 0
        values, alive = _evaluate(self.nodes, self.graph, self.skipped, self.uncertain)
        keep, plan = self._plan(alive, values)
        alive_ids = {id(n) for n in alive}
        self.refused = {id(n) for n in self.nodes if id(n) not in alive_ids or id(n) in keep}
        if not plan:
            return 0
        removed = [n for n in alive if id(n) not in keep]
        for node in removed:
            node.outputs.clear()
            node.inputs.clear()
        for tensor, value in plan:
            tensor.to_constant(value)
        return len(removed)

    def _plan(self, alive: list[gs.Node], values: dict[str, np.ndarray]):
        """Walk back from the region's readers: store the values a node hands out, or keep it.

        Returns the ids of the nodes kept, and (tensor, value) pairs to store.
        """
        alive_ids = {id(n) for n in alive}
        keep: set[int] = set()
        outputs = {t.name for t in self.graph.outputs}
        plan = []
        for node in reversed(alive):
            needed = [o for o in node.outputs if o.name and (
                o.name in outputs or any(id(c) not in alive_ids or id(c) in keep for c in o.outputs))]
            refusals = [r for r in (self._store_refusal(o, values.get(o.name)) for o in needed) if r]
            if refusals:
                keep.add(id(node))
                self.skipped.append(Skip(_label(node), node.op, refusals[0]))
            else:
                plan.extend((o, values[o.name]) for o in needed)
        return keep, plan

    def _store_refusal(self, out: gs.Tensor, value) -> str | None:
        if not isinstance(value, np.ndarray) or si.onnx_type(value.dtype) not in si.STORABLE:
            return "its value cannot be stored as an initializer"
        bound = max(self.limit, self.source[out.name])
        return _too_big(value.nbytes, self.limit) if value.nbytes > bound else None


def _label(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def _too_big(nbytes: int, limit: int) -> str:
    return (f"folded value would take {nbytes} bytes, more than fold_size_limit ({limit}) "
            "and than the largest initializer it would replace")


def _usable(t) -> bool:
    return isinstance(t, gs.Constant) and not isinstance(t._values, SparseValues)


def _evaluate(nodes: list[gs.Node], graph: gs.Graph, skipped: list[Skip], uncertain: set[int]):
    """Values of the region's tensors, and the nodes that evaluated.

    One session for the whole region; when ORT names a failing node, that node and what
    depends on it leave the region and the rest runs again.
    """
    alive = list(nodes)
    for _ in range(MAX_RETRIES):
        if not alive:
            return {}, alive
        try:
            return _run(alive, graph, {}, uncertain), alive
        except _EvalError as e:
            if e.index is None:
                break
            bad = alive[e.index]
            skipped.append(Skip(_label(bad), bad.op, f"onnxruntime cannot evaluate it: {e}"))
            dead = set()
            for node in alive:  # bad and what depends on it
                if node is bad or any(t.name in dead for t in node.inputs if t.name):
                    dead.update(o.name for o in node.outputs)
            alive = [n for n in alive if not any(o.name in dead for o in n.outputs)]
    return _evaluate_one_by_one(alive, graph, skipped, uncertain)


def _evaluate_one_by_one(nodes: list[gs.Node], graph: gs.Graph, skipped: list[Skip], uncertain: set[int]):
    values: dict[str, np.ndarray] = {}
    alive = []
    for node in nodes:
        feeds = {t.name: values.get(t.name) for t in node.inputs if t.name and not isinstance(t, gs.Constant)}
        if not all(isinstance(v, np.ndarray) for v in feeds.values()):
            continue  # an input failed to evaluate, or is a sequence
        try:
            values.update(_run([node], graph, feeds, uncertain))
            alive.append(node)
        except _EvalError as e:
            skipped.append(Skip(_label(node), node.op, f"onnxruntime cannot evaluate it: {e}"))
    return values, alive


class _EvalError(Exception):
    def __init__(self, message: str, index: int | None):
        super().__init__(message)
        self.index = index  # position of the failing node in the evaluated list, if ORT named it


def _run(nodes: list[gs.Node], graph: gs.Graph, feeds: dict[str, np.ndarray], uncertain: set[int]):
    """Evaluate ``nodes`` (topologically ordered) on their constant inputs and ``feeds``.

    Returns only the values that may be stored: graph outputs, values read outside
    ``nodes`` or by a node that may stay (``uncertain``). Other intermediates are dropped.
    """
    ids, graph_outputs = {id(n) for n in nodes}, {t.name for t in graph.outputs}
    protos, inits, names = [], {}, []
    for i, node in enumerate(nodes):
        protos.append(OnnxExporter.export_node(node))
        protos[-1].name = _NODE_NAME.format(i)
        inits.update((t.name, t) for t in node.inputs if isinstance(t, gs.Constant))
        names += [o.name for o in node.outputs if o.name and (o.name in graph_outputs or any(
            id(c) not in ids or id(c) in uncertain for c in o.outputs))]
    if not names:
        return {}
    inputs = [helper.make_tensor_value_info(k, si.onnx_type(v.dtype), v.shape) for k, v in feeds.items()]
    outputs = [onnx.ValueInfoProto(name=n) for n in names]
    initializers = [OnnxExporter.export_tensor_proto(t) for t in inits.values()]
    imports = si.opset_imports(graph)
    model = helper.make_model(helper.make_graph(protos, "fold", inputs, outputs, initializers),
                              opset_imports=imports)
    model.ir_version = si.ir_version(imports)
    try:
        sess = runtime.session(model, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, threads=1)
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a failure is expected and reported as a Skip, not logged
        return dict(zip(names, sess.run(names, feeds, quiet), strict=True))
    except Exception as e:  # any ORT failure means: do not fold this
        text = str(e.__cause__ or e)
        found = _NODE_NAME_RE.search(text)
        raise _EvalError(_short(text) or type(e).__name__, int(found.group(1)) if found else None) from e


def _short(text: str) -> str:
    """ORT's own words, without its source location and C++ signature."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split("Status Message:", 1)[-1]
    return _ORT_LOCATION_RE.sub("", first).strip()[:200]
