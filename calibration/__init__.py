"""Calibration: statistics collection and range selection for int8 quantization (not built yet)."""
