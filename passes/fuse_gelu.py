"""Fuse the exporters' GELU subgraphs into one Gelu node.

Two formulas are matched::

    erf (exact):  y = x * 0.5 * (1 + erf(x / sqrt(2)))
    tanh approx:  y = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
                  (also with the inner polynomial factored: sqrt(2/pi) * x * (1 + 0.044715 * x^2))

Exporters write the same products with different groupings and constants:
``Div(x, 1.4142135)`` or ``Mul(x, 0.70710678)``; the 0.5 applied to x first, to
``x * (1 + erf)`` last, or to ``1 + erf``; ``Pow(x, 3)`` or ``x * x * x``; any operand
order. So the matcher reads each product as a monomial: a tree of Mul, Div by a
constant and Pow by a constant 2 or 3, whose inner tensors have no other reader and
are no graph output, is flattened to ``coefficient * product of leaf tensors``. A
GELU is an Erf (or Tanh) whose argument is ``c * x`` (or the polynomial in x), whose
output only feeds ``+ 1``, and whose ``1 + erf`` is multiplied, by a chain of Muls
that only feed each other, into exactly ``0.5 * x * (1 + erf)``. Constants must be
scalars and match to 1e-4 relative. Everything the pattern computes on the way is
removed; the last tensor keeps its name.

The node written depends on the opset and ``--target``:

- opset >= 20: standard ``Gelu(x; approximate="none" | "tanh")``;
- below 20 with ``Target.ONNXRUNTIME``: com.microsoft ``Gelu(x)`` (the erf formula)
  or ``FastGelu(x)`` (the tanh formula, onnxruntime's contrib op of that name);
- below 20 with the standard target: nothing, with a reason in ``skipped``.

With ``Target.ONNXRUNTIME`` a preceding bias add is absorbed as onnxruntime's own
online BiasGeluFusion does: ``Gelu(Add(y, b))`` with ``b`` a 1-D constant of the
size of y's static last dim, and the Add read by nothing else, becomes
com.microsoft ``BiasGelu(y, b)`` (erf) or ``FastGelu(y, b)`` (tanh). This applies
to the nodes fused here and to Gelu nodes already in the model.

Only float32 is fused: onnxruntime's CPU kernels for Gelu-20 and for the
com.microsoft ops are float only, and a model that no longer loads there is no
optimization. A size-1 constant of rank 1 in the product would broadcast a rank-0
x to rank 1, so it is accepted only when x's rank is known to be at least 1.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.config import OptimizeConfig, Target
from onnxopt.graph_utils import Names, finish, is_graph_output, is_standard, only_consumer, opset, producer
from onnxopt.pass_base import GraphPass, PassResult, Skip
from onnxopt.passes.fuse_conv_activation import MS_DOMAIN, with_ms_opset
from onnxopt.passes.fuse_layer_norm import Dims, constant, other_input, sole_reader, symbolic_dims

logger = logging.getLogger(__name__)

RTOL = 1e-4
SQRT_HALF = 1.0 / math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715
MAX_OUTER_MULS = 3  # 0.5 * x * (1 + erf) takes at most this many Muls after the Add


def close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(b)


@dataclass
class Monomial:
    """``coef * prod(leaves)``: what a tree of products computes."""

    coef: float = 1.0
    leaves: Counter = field(default_factory=Counter)  # tensor name -> power
    tensors: dict = field(default_factory=dict)  # tensor name -> tensor
    const_dtypes: set = field(default_factory=set)
    max_const_rank: int = 0

    def only(self, *tensors: gs.Tensor) -> bool:
        """The leaves are exactly these tensors (with repetition)."""
        return self.leaves == Counter(t.name for t in tensors)


def _factor(graph: gs.Graph, node: gs.Node) -> list[tuple[gs.Tensor, int]] | None:
    """The factors a product node multiplies, as (tensor, power); None for other nodes."""
    if not is_standard(node) or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op == "Mul":
        return [(a, 1), (b, 1)]
    c = constant(graph, b)
    if c is None or c.size != 1 or c.dtype.kind != "f":
        return None
    v = float(c.reshape(-1)[0])
    if node.op == "Div" and v != 0:
        return [(a, 1), (b, -1)]
    if node.op == "Pow" and v in (2.0, 3.0):
        return [(a, int(v))]
    return None


def monomial(graph: gs.Graph, root: gs.Tensor) -> Monomial:
    """``root`` flattened through single-reader Mul / Div-by-constant / Pow-by-2-or-3 nodes."""
    mono = Monomial()
    stack: list[tuple[gs.Tensor, int, bool]] = [(root, 1, True)]
    while stack:
        t, power, is_root = stack.pop()
        c = constant(graph, t)
        if c is not None and c.size == 1 and c.ndim <= 1 and c.dtype.kind == "f":
            mono.coef *= float(c.reshape(-1)[0]) ** power
            mono.const_dtypes.add(c.dtype)
            mono.max_const_rank = max(mono.max_const_rank, c.ndim)
            continue
        node = producer(t)
        single = is_root or (len(t.outputs) == 1 and not is_graph_output(graph, t))
        factors = _factor(graph, node) if node is not None and single else None
        if factors is None:
            mono.leaves[t.name] += power
            mono.tensors[t.name] = t
            continue
        stack.extend((f, power * p, False) for f, p in factors)
    return mono


def scalar(graph: gs.Graph, t: gs.Tensor) -> tuple[float, int] | None:
    """(value, rank) of a float constant with one element and rank <= 1."""
    v = constant(graph, t)
    if v is None or v.size != 1 or v.ndim > 1 or v.dtype.kind != "f":
        return None
    return float(v.reshape(-1)[0]), v.ndim


def _one_plus(graph: gs.Graph, t: gs.Tensor) -> tuple[gs.Tensor, int] | None:
    """(output, rank of the 1) of the single ``Add(t, 1)`` reading ``t``."""
    add = sole_reader(graph, t, "Add")
    one = None if add is None else other_input(add, t)
    v = None if one is None else scalar(graph, one)
    return (add.outputs[0], v[1]) if v is not None and close(v[0], 1) else None


def _erf_argument(graph: gs.Graph, u: gs.Tensor) -> tuple[gs.Tensor, Monomial] | None:
    mono = monomial(graph, u)
    if len(mono.leaves) != 1 or sum(mono.leaves.values()) != 1 or not close(mono.coef, SQRT_HALF):
        return None
    return next(iter(mono.tensors.values())), mono


def _tanh_argument(graph: gs.Graph, u: gs.Tensor) -> tuple[gs.Tensor, Monomial] | None:
    """x from sqrt(2/pi) * (x + 0.044715 x^3) or sqrt(2/pi) * x * (1 + 0.044715 x^2)."""
    mono = monomial(graph, u)
    if not close(mono.coef, SQRT_2_OVER_PI):
        return None
    for inner in list(mono.tensors.values()):
        add = producer(inner)
        if add is None or add.op != "Add" or not is_standard(add) or len(add.inputs) != 2:
            continue
        if not read_once(graph, inner):
            continue
        rest = [t for t in mono.tensors.values() if t is not inner]
        for a, b in (add.inputs, add.inputs[::-1]):
            poly = monomial(graph, b) if read_once(graph, b) else None
            if poly is None or not close(poly.coef, TANH_CUBIC):
                continue
            if mono.only(inner) and poly.only(a, a, a):
                x = a
            elif len(rest) == 1 and mono.only(inner, rest[0]) and _is_one(graph, a) and poly.only(rest[0], rest[0]):
                x = rest[0]
            else:
                continue
            mono.const_dtypes |= poly.const_dtypes
            mono.max_const_rank = max(mono.max_const_rank, poly.max_const_rank)
            return x, mono
    return None


def read_once(graph: gs.Graph, t: gs.Tensor) -> bool:
    return len(t.outputs) == 1 and not is_graph_output(graph, t)


def _is_one(graph: gs.Graph, t: gs.Tensor) -> bool:
    v = scalar(graph, t)
    return v is not None and v[1] == 0 and close(v[0], 1)


def _outer(graph: gs.Graph, x: gs.Tensor, p: gs.Tensor) -> tuple[gs.Tensor, Monomial] | None:
    """The tensor equal to 0.5 * x * p, following the Mul chain that starts at p."""
    cur = p
    for _ in range(MAX_OUTER_MULS):
        mul = sole_reader(graph, cur, "Mul")
        if mul is None:
            return None
        mono = monomial(graph, mul.outputs[0])
        if mono.only(x, p) and close(mono.coef, 0.5):
            return mul.outputs[0], mono
        cur = mul.outputs[0]
    return None


@dataclass
class GeluMatch:
    x: gs.Tensor
    out: gs.Tensor
    approximate: str  # "none" (erf) or "tanh"
    dtypes: set
    max_const_rank: int


def match_gelu(graph: gs.Graph, node: gs.Node) -> GeluMatch | None:
    """The GELU around the Erf or Tanh ``node``, if any."""
    if len(node.inputs) != 1 or not read_once(graph, node.inputs[0]):
        return None
    found = (_erf_argument if node.op == "Erf" else _tanh_argument)(graph, node.inputs[0])
    if found is None or isinstance(found[0], gs.Constant):
        return None
    x, mono = found
    one = _one_plus(graph, node.outputs[0])
    outer = None if one is None else _outer(graph, x, one[0])
    if outer is None:
        return None
    out, omono = outer
    rank = max(mono.max_const_rank, omono.max_const_rank, one[1])
    return GeluMatch(x, out, "none" if node.op == "Erf" else "tanh", mono.const_dtypes | omono.const_dtypes, rank)


# The com.microsoft op that computes Gelu(y + bias), by formula.
BIAS_TARGET = {"none": "BiasGelu", "tanh": "FastGelu"}


def gelu_formula(node: gs.Node) -> str | None:
    """"none"/"tanh" for a one-input Gelu node (standard or com.microsoft), else None."""
    if len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    if node.op == "Gelu" and is_standard(node):
        return str(node.attrs.get("approximate", "none"))
    if node.domain == MS_DOMAIN and node.op in ("Gelu", "FastGelu"):
        return "none" if node.op == "Gelu" else "tanh"
    return None


class FuseGeluPass(GraphPass):
    """x * 0.5 * (1 + erf(x / sqrt 2)) and its tanh approximation -> one Gelu node.

    Standard Gelu from opset 20; com.microsoft Gelu / FastGelu below it with
    ``Target.ONNXRUNTIME``, which also absorbs a 1-D bias add (BiasGelu, FastGelu).
    """

    name = "fuse_gelu"

    def __init__(self, target: Target = OptimizeConfig.target):
        self.target = target
        self._shapes: dict[str, Dims] | None = None

    @classmethod
    def from_config(cls, config: OptimizeConfig) -> FuseGeluPass:
        return cls(target=config.target)

    def call(self, graph: gs.Graph) -> PassResult:
        self._shapes = None
        stats: Counter = Counter()
        skipped = []
        names = Names(graph)
        for node in list(graph.nodes):
            if node.op not in ("Erf", "Tanh") or not is_standard(node):
                continue
            match = match_gelu(graph, node)
            if match is not None and self._shapes is None:
                self._shapes = symbolic_dims(graph)
            result = None if match is None else self._rewrite(graph, match, names)
            if result in ("gelu_erf", "gelu_tanh"):
                stats[result] += 1
            elif result:
                logger.debug("not fusing the GELU at %s: %s", node.name, result)
                skipped.append(Skip(node.name, node.op, f"GELU pattern left as it is: {result}"))
        if stats:
            finish(graph)  # the replaced nodes still read x until they are cleaned up
        if self.target is Target.ONNXRUNTIME:
            gelus = [n for n in graph.nodes if gelu_formula(n) in BIAS_TARGET]
            if gelus and self._shapes is None:
                self._shapes = symbolic_dims(graph)
            stats["bias_gelu"] += sum(self._absorb_bias(graph, n) for n in gelus)
        stats = Counter({k: v for k, v in stats.items() if v})
        if stats:
            if any(n.domain == MS_DOMAIN for n in graph.nodes):
                graph.import_domains = with_ms_opset(graph)
            finish(graph)
        return PassResult(graph, bool(stats), dict(stats), tuple(skipped))

    def _dims(self, graph: gs.Graph, t: gs.Tensor) -> Dims | None:
        """``t``'s dims, from shapes taken once per call before anything is rewritten."""
        return None if self._shapes is None else self._shapes.get(t.name)

    def _rewrite(self, graph: gs.Graph, match: GeluMatch, names: Names) -> str:
        """Write the Gelu node; returns the stats key, or the reason it was refused."""
        if match.dtypes != {np.dtype(np.float32)}:
            return f"fused for float32 only, not {', '.join(sorted(map(str, match.dtypes)))}"
        if match.max_const_rank >= 1 and not (self._dims(graph, match.x) or ()):
            return "a rank-1 constant could broadcast x, whose rank is not known to be >= 1"
        if opset(graph) >= 20:
            op, domain, attrs = "Gelu", None, {"approximate": match.approximate}
        elif self.target is Target.ONNXRUNTIME:
            op, domain, attrs = ("Gelu" if match.approximate == "none" else "FastGelu"), MS_DOMAIN, {}
        else:
            return f"opset {opset(graph)} < 20 has no Gelu (--target onnxruntime fuses it)"
        producer(match.out).outputs.clear()
        kind = "erf" if match.approximate == "none" else "tanh"
        node = gs.Node(op, names(f"{match.out.name}_Gelu"), attrs, [match.x], [match.out], domain=domain)
        graph.nodes.append(node)
        return f"gelu_{kind}"

    def _absorb_bias(self, graph: gs.Graph, node: gs.Node) -> bool:
        """Gelu(Add(y, b)) -> BiasGelu(y, b) / FastGelu(y, b); True when rewritten."""
        formula = gelu_formula(node)
        add = None if formula not in BIAS_TARGET else producer(node.inputs[0])
        if add is None or add.op != "Add" or not is_standard(add) or not only_consumer(graph, node.inputs[0], node):
            return False
        for y, b in (add.inputs, add.inputs[::-1]):
            bias = constant(graph, b)
            if bias is None or bias.ndim != 1 or bias.dtype != np.float32 or isinstance(y, gs.Constant):
                continue
            dims = self._dims(graph, y)
            if dims and dims[-1] == bias.shape[0]:
                node.op, node.domain, node.attrs = BIAS_TARGET[formula], MS_DOMAIN, {}
                node.inputs.clear()
                node.inputs.extend([y, b])
                return True
        return False
