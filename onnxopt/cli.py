"""Command line: ``onnxopt IN -o OUT`` and ``onnxopt validate A B``.

The only module that prints, reads sys.argv or sets log levels. Exit codes:
0 success, 1 validation failed (outputs moved beyond tolerance), 2 bad input or
usage (one line on stderr, nothing written), 3 a bug in onnxopt (with traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

from onnxopt import (
    __version__,
    analysis,
    cli_lossy,
    cli_pack,
    cli_weights,
    io,
    presets,
    report,
    validate,
)
from onnxopt import cli_common as common
from onnxopt.cli_common import EXIT_BUG, EXIT_OK, EXIT_USAGE, EXIT_VALIDATION
from onnxopt.config import (
    ActivationType,
    CalibrationConfig,
    CalibrationMethod,
    FactorizeConfig,
    OptimizeConfig,
    Target,
)
from onnxopt.errors import UserError, ValidationFailed, VerificationError
from onnxopt.optimizer import optimize_model

logger = logging.getLogger("onnxopt")

SUBCOMMANDS = ("validate", "pack", "unpack")


def optimize_parser() -> argparse.ArgumentParser:
    p = common.Parser(prog="onnxopt", description="Optimize an ONNX model and check it still computes the same thing. "
                "Other commands: onnxopt validate A.onnx B.onnx; onnxopt pack IN.onnx -o OUT.onnxz; "
                "onnxopt unpack IN.onnxz -o OUT.onnx")
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("-O", dest="level", choices=["0", "1", "2"], default="1",
                   help="-O0: load and save only; -O1 (default): lossless passes to a fixed point; "
                   "-O2: -O1 then low-rank factorization (--factorize)")
    p.add_argument("--passes", metavar="A,B", help="run exactly these passes instead of the preset")
    p.add_argument("--skip", metavar="A,B", default="", help="leave these passes out")
    p.add_argument("--target", choices=[t.value for t in Target], default=Target.STANDARD.value,
                   help="standard: standard ONNX ops only (default); onnxruntime: may use com.microsoft FusedConv; "
                   "tensorrt: standard ops, int8 symmetric with zero points 0")
    p.add_argument("--opset", type=int, metavar="N", help="convert to opset N first (e.g. 17 for LayerNormalization "
                   "fusion); the output then needs a runtime that supports opset N")
    p.add_argument("--outputs", metavar="A,B", help="keep only these graph outputs and prune what feeds nothing else")
    p.add_argument("--verify-each", action="store_true", help="run onnxruntime after every pass; name the first "
                   "pass that changes the outputs")
    p.add_argument("--no-validate", action="store_true", help="skip the final comparison with the input model")
    p.add_argument("--force", action="store_true", help="allow writing over the input file")
    p.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    _int8_options(p)
    _factorize_options(p)
    cli_weights.add_options(p)
    common.common_options(p)
    return p


def _factorize_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("low-rank factorization (lossy; with --calibrate the ranks come from the data)")
    g.add_argument("--factorize", action="store_true", help="replace MatMul/Gemm/Conv layers by two thinner ones "
                   "where that saves MACs; with --min-cosine/--min-top1 and --calibrate, ranks are allocated by "
                   "measured sensitivity to meet the budget")
    g.add_argument("--max-error", type=float, metavar="E",
                   help="with --factorize: per-layer relative output error on the calibration samples (weight "
                   f"error without them) (default {FactorizeConfig.max_error}); with --int8 or --weight-form: "
                   "an accuracy budget, every float output's relative L2 error <= E (with both: refused)")
    g.add_argument("--rank-energy", type=float, metavar="F", help="instead: keep this fraction of each layer's "
                   "squared singular values")
    g.add_argument("--rank-ratio", type=float, metavar="F", help="instead: keep this fraction of each layer's MACs")
    g.add_argument("--min-saving", type=float, default=FactorizeConfig.min_saving, metavar="F",
                   help="factorize a layer only if it saves at least this fraction of its MACs (default %(default)s)")
    g.add_argument("--no-conv-factorize", action="store_true", help="factorize MatMul/Gemm layers only")
    g.add_argument("--flattened", action="store_true", help="KxK convolutions may also take the flattened form "
                   "(1x1, Kx1 and 1xK depthwise, 1x1) where it beats the spatial one (not with a budget)")


def _int8_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("int8 quantization")
    g.add_argument("--int8", action="store_true", help="quantize to int8 QDQ after the lossless passes")
    g.add_argument("--calibrate", metavar="X.npz", help="calibration samples (int8 and factorization): .npz keyed "
                   "by input name, first axis = samples, or a folder of them (shapes may differ between files)")
    g.add_argument("--calibration-samples", type=int, metavar="N", help="use at most N calibration samples")
    g.add_argument("--calibration-method", choices=[m.value for m in CalibrationMethod],
                   default=CalibrationMethod.ENTROPY.value, help="range selection (default: entropy, TensorRT's KL)")
    g.add_argument("--percentile", type=float, default=CalibrationConfig.percentile, metavar="P",
                   help="percentile of |x| for --calibration-method percentile")
    g.add_argument("--calibration-cache", metavar="R.json", help="reuse ranges saved here (no calibration run), "
                   "or save them here")
    g.add_argument("--activation-type", choices=[a.value for a in ActivationType],
                   help="int8 or uint8 activations (default: uint8, which onnxruntime on x86 fuses everywhere; "
                   "int8 with --target tensorrt)")
    g.add_argument("--exclude", metavar="A,B", help="node names or op types to keep in float")
    g.add_argument("--sensitivity", action="store_true", help="measure what quantizing each layer alone costs "
                   "on the calibration samples; list the worst (all in --report). With a budget (--min-cosine, "
                   "--min-top1, --max-error), the costliest layers are kept in float until it is met on the "
                   "calibration samples")


def validate_parser() -> argparse.ArgumentParser:
    p = common.Parser(prog="onnxopt validate", description="Run two models in onnxruntime on the same inputs and "
                "report how far the second's outputs are from the first's.")
    p.add_argument("reference", metavar="A.onnx")
    p.add_argument("candidate", metavar="B.onnx")
    p.add_argument("--rtol", type=float, default=validate.LOSSLESS_RTOL,
                   help=f"pass if every output's relative L2 error is at most this "
                   f"(default {validate.LOSSLESS_RTOL:g})")
    common.common_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "validate":
            return _validate(validate_parser().parse_args(argv[1:]))
        if argv and argv[0] in ("pack", "unpack"):
            return getattr(cli_pack, argv[0])(argv[1:])
        return _optimize(optimize_parser().parse_args(argv))
    except UserError as e:
        print(f"onnxopt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValidationFailed, VerificationError) as e:
        print(f"onnxopt: validation failed: {e}", file=sys.stderr)
        return EXIT_VALIDATION
    except KeyboardInterrupt:
        print("onnxopt: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("onnxopt: internal error (a bug in onnxopt; nothing was written). Please report it with the "
              "traceback above.", file=sys.stderr)
        return EXIT_BUG


def _configs(args) -> tuple[str, list[str], OptimizeConfig]:
    preset = f"O{args.level}"
    names = presets.pass_names("O1" if preset == "O2" else preset, common.split_csv(args.passes),
                               common.split_csv(args.skip) or ())
    target = Target(args.target)
    if args.int8:
        # A com.microsoft FusedConv cannot be quantized: the float part stays standard ONNX.
        names = [n for n in names if n != "fuse_conv_activation"]
        target = Target.STANDARD if target is Target.ONNXRUNTIME else target
        if not args.calibrate and not (args.calibration_cache and Path(args.calibration_cache).exists()):
            raise UserError("--int8 needs calibration samples: --calibrate samples.npz (or an existing "
                            "--calibration-cache)")
    elif args.calibration_cache or args.sensitivity:
        raise UserError("--calibration-cache and --sensitivity go with --int8")
    elif args.calibrate and not common.factorizing(args) and not args.weight_form:
        raise UserError("--calibrate goes with --int8, --factorize or -O2 (or --weight-form)")
    cli_weights.check(args, common.factorizing(args))
    outputs = tuple(common.split_csv(args.outputs)) if args.outputs else None
    return preset, names, OptimizeConfig(target=target, outputs=outputs, opset=args.opset)


def _optimize(args) -> int:
    common.setup_logging(args)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    preset, names, config = _configs(args)
    budget = common.budget(args)
    io.check_output_path(args.output, protect=args.input, force=args.force)
    if args.report:
        io.check_output_path(args.report, protect=args.input)
    model = io.load_model(args.input)
    needs_feeds = args.verify_each or not args.no_validate
    feeds, source = common.feeds(args, model) if needs_feeds else ([], "")
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    result = optimize_model(model, names, config, verify_feeds=feeds if args.verify_each else None)
    timings["optimize"] = time.perf_counter() - t
    done = cli_lossy.run(args, result, budget, feeds, source, timings)
    final, final_data, tuning, failure = done.model, done.data, done.tuning, done.failure()

    check = None
    if not args.no_validate and not failure:
        t = time.perf_counter()
        reference = args.input if config.outputs is None else _select_outputs(model, config.outputs)
        candidate = final_data if final_data is not None else final
        check = validate.compare(reference, candidate, feeds, source=source, budget=budget,
                                 latency_repeat=args.latency_repeat)
        timings["validate"] = time.perf_counter() - t

    written = None
    if (check is None or check) and not failure:
        t = time.perf_counter()
        written = str(io.save_model(final, args.output, protect=args.input, force=args.force, data=final_data))
        timings["save"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    first = feeds[0] if feeds else None
    facts = report.build(
        input_path=args.input, output_path=written, preset=preset, passes=result.passes, target=args.target,
        before=analysis.model_stats(model, first, io.file_size(args.input)),
        after=analysis.model_stats(final, first, io.file_size(written) if written else final.ByteSize()),
        records=result.records, validation=check, seconds=timings,
        quantization=done.quant.facts if done.quant else None, sensitivity=tuning.facts() if tuning else None,
        factorization=done.factored.facts() if done.factored else None,
    )
    text = report.render(facts)
    if done.weights:
        facts["weight_form"] = done.weights.facts
        text += "\n\n" + "\n".join(cli_weights.render(done.weights.facts))
    _emit(args, facts, text)
    if failure:
        raise ValidationFailed(f"{failure}; {args.output} not written")
    if check is not None and not check:
        raise ValidationFailed(f"{check.summary()}; {args.output} not written (--no-validate writes it unchecked)")
    return EXIT_OK


def _select_outputs(model, outputs: tuple[str, ...]):
    """The reference model restricted to the outputs the user kept, for a like-for-like comparison."""
    ref = type(model)()
    ref.CopyFrom(model)
    kept = [o for o in ref.graph.output if o.name in outputs]
    del ref.graph.output[:]
    ref.graph.output.extend(kept)
    return ref


def _validate(args) -> int:
    common.setup_logging(args)
    if args.report:
        io.check_output_path(args.report, protect=args.reference)
    a, b = io.load_model(args.reference), io.load_model(args.candidate)
    feeds, source = common.feeds(args, a)
    check = validate.compare(a, b, feeds, source=source, budget=common.budget(args), latency_repeat=args.latency_repeat)
    facts = {
        "onnxopt": __version__, "reference": args.reference, "candidate": args.candidate,
        "reference_size_bytes": io.file_size(args.reference), "candidate_size_bytes": io.file_size(args.candidate),
        "validation": check.to_json(),
    }
    text = report.render_validation(check)
    if check.latency_ms:
        text += f"\n  latency (ORT): {check.latency_ms['a']:.3f} ms -> {check.latency_ms['b']:.3f} ms"
    _emit(args, facts, text)
    if not check:
        raise ValidationFailed(check.summary())
    return EXIT_OK


def _emit(args, facts: dict, text: str) -> None:
    if args.report:
        report.write_json(facts, args.report)
    if not args.quiet:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
