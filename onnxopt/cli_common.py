"""What the commands of ``onnxopt`` share: the parser that turns usage errors into one line, the
common options, logging, exit codes, validation inputs and the budget from the options.

``cli`` (optimize, validate), ``cli_lossy``, ``cli_weights`` and ``cli_pack`` (pack, unpack) build on
it; it imports none of them.
"""

from __future__ import annotations

import argparse
import logging
import sys

from onnxopt import data, runtime, validate
from onnxopt.errors import UserError

EXIT_OK, EXIT_VALIDATION, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 like every other user error."""

    def error(self, message: str):
        raise UserError(message)


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="X.npz", help="sample inputs: .npz keyed by input name, first axis = samples "
                   "(or a folder of them); default: generated from the input signature")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="concrete shape for an input with dynamic axes (repeatable)")
    p.add_argument("--samples", type=int, metavar="N", help="use at most N samples of --data")
    p.add_argument("--latency-repeat", type=int, default=20, metavar="N",
                   help="runs per latency median (0: do not measure latency)")
    p.add_argument("--min-cosine", type=float, metavar="C", help="accuracy budget: every float output keeps mean "
                   "cosine >= C against the reference")
    p.add_argument("--min-top1", type=float, metavar="A", help="accuracy budget: 2-D logits keep top-1 agreement "
                   ">= A (a fraction, e.g. 0.99)")
    p.add_argument("--report", metavar="R.json", help="write the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")


def setup_logging(args) -> None:
    from onnx_graphsurgeon.logger import G_LOGGER

    level = logging.ERROR if args.quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="onnxopt: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    G_LOGGER.severity = G_LOGGER.ERROR if args.verbose < 2 else G_LOGGER.INFO


def split_csv(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def parse_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 0:
            raise UserError(f"--shape {spec!r}: expected NAME:DxDxD, e.g. input:1x3x224x224")
        shapes[name] = shape
    return shapes


def feeds(args, model) -> tuple[list[dict], str]:
    """Inputs for validation: --data, else the calibration samples (int8), else generated ones."""
    given = parse_shapes(args.shape)
    if args.samples is not None and args.samples < 1:
        raise UserError("--samples must be at least 1")
    if args.data:
        return data.load_feeds(args.data, model, limit=args.samples), f"data: {args.data}"
    if (getattr(args, "int8", False) or factorizing(args) or getattr(args, "weight_form", None)) \
            and args.calibrate:
        feeds = data.load_feeds(args.calibrate, model, limit=args.samples or args.calibration_samples)
        return feeds, f"calibration data {args.calibrate}, not held out: give --data for that"
    return [runtime.random_feeds(model, shapes=given, seed=0)], "generated inputs"


def budget(args) -> validate.Budget:
    for name in ("min_cosine", "min_top1"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
    max_rel_l2 = output_max_error(args)
    lossy = getattr(args, "int8", False) or factorizing(args) or bool(getattr(args, "weight_form", None)) \
        or args.min_cosine is not None or args.min_top1 is not None
    rtol = getattr(args, "rtol", validate.LOSSLESS_RTOL)
    return validate.Budget(rtol=rtol, lossy=lossy, min_cosine=args.min_cosine, min_top1=args.min_top1,
                           max_rel_l2=max_rel_l2)


def output_max_error(args) -> float | None:
    """--max-error as an output budget: without factorization, where it is the per-layer error instead.
    With factorization and another lossy step both meanings fit: refused."""
    value = getattr(args, "max_error", None)
    if value is None:
        return None
    other = "--int8" if args.int8 else "--weight-form" if args.weight_form else None
    if factorizing(args):
        if other:
            raise UserError(f"--max-error with --factorize and {other} is ambiguous (the factorization's "
                            "per-layer error or the output budget): give --min-cosine/--min-top1 for the budget")
        return None
    if other is None:
        raise UserError("--max-error goes with --factorize (per-layer error), --int8 or --weight-form (budget)")
    if not value > 0:
        raise UserError(f"--max-error must be above 0, got {value}")
    return value


def factorizing(args) -> bool:
    return bool(getattr(args, "factorize", False) or getattr(args, "level", None) == "2")
