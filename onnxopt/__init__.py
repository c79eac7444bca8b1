"""onnxopt: post-training optimizer for ONNX models."""

__version__ = "0.1.0"


def optimize(model, preset: str = "O1", config=None, *, passes=None, skip=()):
    """Optimize an ``onnx.ModelProto`` with a preset (or explicit passes); return a new model.

    >>> import onnx, onnxopt
    >>> smaller = onnxopt.optimize(onnx.load("model.onnx"))          # doctest: +SKIP
    """
    from onnxopt import presets
    from onnxopt.config import OptimizeConfig
    from onnxopt.optimizer import optimize_model

    names = presets.pass_names(preset, passes, skip)
    return optimize_model(model, names, config or OptimizeConfig()).model
