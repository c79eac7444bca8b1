"""The lossy steps of ``onnxopt IN -o OUT``, in order: factorization, then int8 (with the
sensitivity measurement and budget fallback) or an ONNX-native weight form, each on the
previous step's model. Options come as parsed by ``cli.optimize_parser``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import onnx

from onnxopt import cli_common, cli_weights, data, factorize, quantize, sensitivity, validate
from onnxopt.config import (
    ActivationType,
    CalibrationConfig,
    CalibrationMethod,
    FactorizeConfig,
    QuantConfig,
    QuantTarget,
    Target,
)
from onnxopt.errors import UserError


def factorize_step(args, model, budget: validate.Budget) -> factorize.Factorized:
    """Factorize with ranks from the calibration samples (the budget's allocation when one is given)."""
    max_error = FactorizeConfig.max_error if args.max_error is None else args.max_error
    config = FactorizeConfig(max_error=max_error, rank_energy=args.rank_energy, rank_ratio=args.rank_ratio,
                             min_saving=args.min_saving, convs=not args.no_conv_factorize,
                             flattened=args.flattened)
    samples = data.load_feeds(args.calibrate, model, limit=args.calibration_samples) if args.calibrate else None
    if sensitivity.has_budget(budget) and not samples:
        raise UserError("--factorize with --min-cosine/--min-top1 needs --calibrate samples to allocate ranks")
    progress = not args.quiet and sys.stderr.isatty()
    return factorize.factorize_model(model, samples, config, budget if samples else None, progress=progress)


def quantize_step(args, model, budget: validate.Budget, feeds: list[dict], source: str,
                  timings: dict | None = None) -> tuple[quantize.Quantized, sensitivity.Tuning | None]:
    """Calibrate and quantize; with --sensitivity or a budget, measure layers and keep the worst in float."""
    target = QuantTarget.TENSORRT if args.target == Target.TENSORRT.value else QuantTarget.ONNXRUNTIME
    default_type = ActivationType.INT8 if target is QuantTarget.TENSORRT else ActivationType.UINT8
    activation = ActivationType(args.activation_type) if args.activation_type else default_type
    exclude = tuple(cli_common.split_csv(args.exclude) or ())
    qconfig = QuantConfig(activation_type=activation, target=target, exclude=exclude)
    cconfig = CalibrationConfig(method=CalibrationMethod(args.calibration_method), percentile=args.percentile,
                                max_samples=args.calibration_samples, symmetric=target is QuantTarget.TENSORRT)
    samples = data.iter_feeds(args.calibrate, model, limit=args.calibration_samples) if args.calibrate else iter(())
    progress = not args.quiet and sys.stderr.isatty()
    q = quantize.quantize_model(model, samples, qconfig, cconfig, cache=args.calibration_cache, progress=progress)
    if timings is not None:  # the calibration step alone, inside "quantize"
        timings["calibrate"] = q.calibrate_seconds
    tuning = None
    if args.sensitivity or sensitivity.has_budget(budget):
        feeds, source = tuning_feeds(args, model, feeds, source)
        tuning = sensitivity.tune(model, q, qconfig, feeds, budget, sensitivity=args.sensitivity, source=source,
                                  progress=progress)
        q = tuning.quantized
    q.facts = quantize.report(q, cconfig, qconfig)
    if tuning is not None:
        tuning.annotate(q.facts)
    return q, tuning


def tuning_feeds(args, model, feeds: list[dict], source: str) -> tuple[list[dict], str]:
    """Samples for --sensitivity and the budget fallback: the calibration samples, so that --data
    stays held out for the final check."""
    if args.calibrate:
        if not args.data and args.samples is None and feeds:  # validation already read these samples
            return feeds, source
        limit = args.calibration_samples
        return data.load_feeds(args.calibrate, model, limit=limit), f"calibration data {args.calibrate}"
    feeds, source = (feeds, source) if feeds else cli_common.feeds(args, model)
    return feeds, f"{source}; no --calibrate, so not held out"


@dataclass
class Lossy:
    """The model after the lossy steps, and what each did (None: not run)."""

    model: onnx.ModelProto
    data: bytes | None
    factored: factorize.Factorized | None = None
    quant: quantize.Quantized | None = None
    tuning: sensitivity.Tuning | None = None
    weights: cli_weights.WeightForms | None = None

    def failure(self) -> str | None:
        """Why no model meets the budget, or None."""
        return (self.tuning.failure() if self.tuning else None) or (self.weights.failure if self.weights else None)


def run(args, result, budget: validate.Budget, feeds: list[dict], source: str, timings: dict) -> Lossy:
    """Factorization then int8 or a weight form, each on the previous step's model."""
    done = Lossy(result.model, result.data)
    if cli_common.factorizing(args):
        t = time.perf_counter()
        done.factored = factorize_step(args, done.model, budget)
        done.model, done.data = done.factored.model, done.factored.data
        timings["factorize"] = time.perf_counter() - t
    if args.int8:
        t = time.perf_counter()
        done.quant, done.tuning = quantize_step(args, done.model, budget, feeds, source, timings)
        done.model, done.data = done.quant.model, done.quant.data
        timings["quantize"] = time.perf_counter() - t
    if args.weight_form:  # last: fold_constants would fold its Gathers back
        t = time.perf_counter()
        progress = not args.quiet and sys.stderr.isatty()
        done.weights = cli_weights.apply(args, done.model, budget, cli_common.factorizing(args), progress)
        done.model, done.data = done.weights.model, done.weights.data
        timings["weight_form"] = time.perf_counter() - t
    return done
