"""Calibration for int8: streaming statistics of activations and range selection.

    stats = collect(model, data, tensors, CalibrationConfig())   # dict[str, TensorStats]
    ranges = select_ranges(stats, config)                        # dict[str, TensorRange]
    ranges = calibrate(model, data, tensors, config, cache="ranges.json")  # both, with a cache

``data`` is any iterable of feed dicts: ``onnxopt.data.iter_feeds(path, model)``
for .npz files, or a user's own loader.
"""

from onnxopt.calibration.cache import calibrate, fingerprint, load_ranges, save_ranges
from onnxopt.calibration.collect import collect
from onnxopt.calibration.kl import kl_threshold
from onnxopt.calibration.observers import TensorStats
from onnxopt.calibration.ranges import TensorRange, percentile_threshold, select_ranges
from onnxopt.config import CalibrationConfig, CalibrationMethod

__all__ = [
    "CalibrationConfig",
    "CalibrationMethod",
    "TensorRange",
    "TensorStats",
    "calibrate",
    "collect",
    "fingerprint",
    "kl_threshold",
    "load_ranges",
    "percentile_threshold",
    "save_ranges",
    "select_ranges",
]
