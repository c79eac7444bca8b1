"""The pass contract and the pass manager.

A pass mutates a ``gs.Graph`` in place and returns a ``PassResult`` saying, truthfully,
whether it changed anything and what (counts by rewrite). The manager relies on that
flag to stop at a fixed point. A pass that meets a node it cannot handle leaves the
node as it is and lists it in ``skipped`` with the reason; it never half-rewrites.

The manager runs its passes in order, round after round, until a round changes
nothing (or ``max_steps`` rounds ran). It records each pass invocation (time, node
counts, changes), and calls its ``after_each`` hooks after every pass that changed
the graph: that is how ``--verify-each`` names the first pass that moved the outputs.

A pass that raises is a bug in onnxopt. With ``strict=True`` (tests) the manager
re-raises it as ``PassError``. Otherwise it records the failure, disables that pass,
restores the graph as it was at the start of the round and replays the round
without it (passes are deterministic, so the replay reaches the same state minus
the broken rewrite). One copy per round instead of one per pass: copying a large
graph costs more than most passes.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_graphsurgeon as gs

from onnxopt.config import OptimizeConfig
from onnxopt.errors import InternalError, OnnxoptError, PassError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skip:
    """A node a pass looked at and left alone, and why."""

    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class PassResult:
    graph: gs.Graph
    modified: bool
    stats: Mapping[str, int] = field(default_factory=dict)
    skipped: tuple[Skip, ...] = ()


class GraphPass(abc.ABC):
    """One graph rewrite, registered under ``name`` (the file stem and CLI name)."""

    name: ClassVar[str]
    # Lossless passes keep outputs equal to float tolerance and may repeat to a fixed point.
    lossless: ClassVar[bool] = True

    @classmethod
    def from_config(cls, config: OptimizeConfig) -> GraphPass:
        """Build the pass with the options it needs from ``config``."""
        return cls()

    def requires(self, graph: gs.Graph) -> None:  # noqa: B027 - optional hook
        """Raise ``UnsupportedModelError`` to refuse a graph before touching it."""

    @abc.abstractmethod
    def call(self, graph: gs.Graph) -> PassResult:
        """Rewrite ``graph`` in place and return the same graph object."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        self.requires(graph)
        result = self.call(graph)
        if result.graph is not graph:
            raise InternalError(f"pass {self.name!r} returned a different graph object")
        return result


@dataclass
class PassRecord:
    """One invocation of one pass, for the report."""

    name: str
    step: int
    modified: bool
    stats: dict[str, int]
    seconds: float
    nodes_before: int
    nodes_after: int
    skipped: tuple[Skip, ...] = ()
    error: str | None = None


AfterEach = Callable[[GraphPass, gs.Graph, PassResult], None]


class PassManager:
    """Runs passes in order, repeating the round until nothing changes."""

    def __init__(
        self,
        passes: Sequence[GraphPass],
        *,
        max_steps: int = 1,
        after_each: Sequence[AfterEach] = (),
        strict: bool = False,
    ):
        self.passes = list(passes)
        self.max_steps = max_steps
        self.after_each = list(after_each)
        self.strict = strict
        self.records: list[PassRecord] = []

    def run(self, graph: gs.Graph) -> gs.Graph:
        """Run to a fixed point; return the graph (a restored copy if a pass failed)."""
        disabled: set[str] = set()
        for step in range(1, self.max_steps + 1):
            snapshot = None if self.strict else graph.copy()
            while True:
                try:
                    graph, changed = self._round(graph, step, disabled)
                    break
                except _Crashed as crash:
                    disabled.add(crash.name)
                    graph = snapshot.copy()
            if not changed:
                break
        else:
            if self.max_steps > 1:
                logger.info("passes still changing the graph after %d rounds; stopped", self.max_steps)
        return graph

    def _round(self, graph: gs.Graph, step: int, disabled: set[str]) -> tuple[gs.Graph, bool]:
        changed = False
        for p in self.passes:
            if p.name not in disabled:
                changed |= self._run_one(p, graph, step)
        return graph, changed

    def _run_one(self, p: GraphPass, graph: gs.Graph, step: int) -> bool:
        before = len(graph.nodes)
        t0 = time.perf_counter()
        try:
            result = p(graph)
        except OnnxoptError:
            raise
        except Exception as e:
            if self.strict:
                done = [r.name for r in self.records]
                raise PassError(f"pass {p.name!r} failed at step {step} after {done}: {e}") from e
            logger.warning("pass %s failed (%s: %s); it is disabled and its round replayed without it",
                           p.name, type(e).__name__, e)
            self.records.append(
                PassRecord(p.name, step, False, {}, time.perf_counter() - t0, before, before,
                           error=f"{type(e).__name__}: {e}")
            )
            raise _Crashed(p.name) from e
        seconds = time.perf_counter() - t0
        self.records.append(
            PassRecord(p.name, step, result.modified, dict(result.stats), seconds, before,
                       len(graph.nodes), result.skipped)
        )
        logger.debug("%s step %d: %s in %.3fs", p.name, step, dict(result.stats) or "no change", seconds)
        if result.modified:
            for hook in self.after_each:
                hook(p, graph, result)
        return result.modified


class _Crashed(Exception):
    """A pass raised in a non-strict run; carries its name to the round loop."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name
