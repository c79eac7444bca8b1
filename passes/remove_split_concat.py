"""Remove a Split whose parts are concatenated back, in order, on the same axis.

Split partitions x along an axis into consecutive parts p_1..p_n (its sizes always
add up to x's extent), so Concat(..., p_1, ..., p_n, ...) on that axis equals
Concat(..., x, ...): the run of parts is replaced by x and the Split disappears. A
Concat left with one input is the identity and is bypassed (graph output names kept).

After ``merge_parallel`` and ``hoist_split_elementwise`` this finishes an Inception-like
block: parallel 1x1 Conv+Relu branches that are concatenated become one Conv and one Relu.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx_graphsurgeon as gs

from onnxopt.graph_utils import bypass, finish, is_standard, only_consumer, producer
from onnxopt.pass_base import GraphPass, PassResult

logger = logging.getLogger(__name__)



class RemoveSplitConcatPass(GraphPass):
    """Replace Split parts concatenated in order on the Split's axis by the Split's input.

    Handled: every output of one Split, contiguous and in order in a Concat's inputs
    (other inputs around them are kept), axes equal after normalising negative axes
    with the rank when it is known; several runs in one Concat; every Split form.

    Refused: a Split output read by another node, read twice, or that is a graph output;
    parts out of order, interleaved with other inputs, or only some of them; a different
    axis, or a negative and a non-negative axis when the rank is unknown. A single-input
    Concat whose bypass would rename a graph input or output is kept (it is valid ONNX).
    """

    name = "remove_split_concat"

    def call(self, graph: gs.Graph) -> PassResult:
        stats = Counter()
        for concat in [n for n in graph.nodes if n.op == "Concat" and is_standard(n)]:
            removed = 0
            while (run := _find_run(graph, concat)) is not None:
                _remove(concat, *run)
                removed += 1
            stats["remove_split_concat"] += removed
            if removed and len(concat.inputs) == 1:
                if bypass(graph, concat, concat.inputs[0], concat.outputs[0]):
                    stats["bypass_single_concat"] += 1
        stats = {k: v for k, v in stats.items() if v}
        if stats:
            finish(graph)
        return PassResult(graph, bool(stats), stats)


def _rank(tensors) -> int | None:
    return next((len(t.shape) for t in tensors if t is not None and t.shape is not None), None)


def _same_axis(split: gs.Node, concat: gs.Node) -> bool:
    a, b = int(split.attrs.get("axis", 0)), int(concat.attrs["axis"])
    if a == b:
        return True
    rank = _rank([split.inputs[0], *split.outputs, *concat.inputs, *concat.outputs])
    return rank is not None and a % rank == b % rank


def _find_run(graph: gs.Graph, concat: gs.Node) -> tuple[int, gs.Node] | None:
    """(start index, Split) of the first removable run of Split outputs in ``concat``'s inputs."""
    if "axis" not in concat.attrs:
        return None
    inputs = list(concat.inputs)
    for start, t in enumerate(inputs):
        split = producer(t)
        if split is None or split.op != "Split" or not is_standard(split) or not split.inputs:
            continue
        parts = list(split.outputs)
        if t is not parts[0] or len(inputs) - start < len(parts):
            continue
        if not all(inputs[start + i] is p for i, p in enumerate(parts)):
            continue
        # The parts vanish with the Split, so nothing else may read them.
        if all(only_consumer(graph, p, concat) for p in parts) and _same_axis(split, concat):
            return start, split
    return None


def _remove(concat: gs.Node, start: int, split: gs.Node) -> None:
    x, n = split.inputs[0], len(split.outputs)
    inputs = list(concat.inputs)
    inputs[start:start + n] = [x]
    concat.inputs.clear()
    concat.inputs.extend(inputs)
    split.inputs.clear()
    split.outputs.clear()
    logger.debug("remove_split_concat: %s folded into %s", split.name, concat.name)
