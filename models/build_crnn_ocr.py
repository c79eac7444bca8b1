"""Build models/crnn_ocr.onnx: a CRNN text-line recognizer in the style of PaddleOCR (random weights).

    python models/build_crnn_ocr.py

Writes, next to this script:
    crnn_ocr.onnx                 opset 11, TorchScript exporter, BN not folded, dynamic N and W
    crnn_ocr.calib.npz            {'x': (16, 3, 32, 100) float32 synthetic text lines}

Layout:

    x (N,3,32,W), normalized like PaddleOCR: (pixel/255 - 0.5) / 0.5
      Conv3x3 3->16   -BN-ReLU, MaxPool 2x2        -> (N,16,16,W/2)
      Conv3x3 16->32  -BN-ReLU, MaxPool 2x2        -> (N,32, 8,W/4)
      Conv3x3 32->64  -BN-ReLU
      Conv3x3 64->64  -BN-ReLU, MaxPool (2,1)      -> (N,64, 4,W/4)
      depthwise Conv3x3 64 (group 64)-BN-HardSwish    (exported at opset 11 as HardSigmoid*x)
      pointwise Conv1x1 64->96 -BN-HardSwish, MaxPool (2,1) -> (N,96, 2,W/4)
      Conv3x3 96->96  -BN-ReLU, MaxPool (2,1)      -> (N,96, 1,W/4)
      reshape (N, C*H, W') and permute to (W', N, C)   (Shape/Gather/Mul/Concat/Reshape chain)
      bidirectional LSTM, hidden 48                -> (W', N, 96)
      Linear 96->37, Softmax over classes          -> probs (W', N, 37)

37 classes = CTC blank + 0-9 + a-z. W must be >= 4; W' = floor(floor(W/2)/2).
Weights are random (seeded, He-initialised) with non-trivial BatchNorm
statistics (eps=1e-3 on every second BN, the Paddle/Keras default), so BN
folding is exercised numerically.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _buildutil as bu  # noqa: E402

NAME = "crnn_ocr"
SEED = 0
OPSET = 11
NUM_CLASSES = 37
HIDDEN = 48
N_CALIB, CALIB_W = 16, 100


def conv_bn(
    cin: int, cout: int, k: int = 3, groups: int = 1, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


class CRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            conv_bn(3, 16), nn.MaxPool2d(2, 2),
            conv_bn(16, 32), nn.MaxPool2d(2, 2),
            conv_bn(32, 64),
            conv_bn(64, 64), nn.MaxPool2d((2, 1), (2, 1)),
            conv_bn(64, 64, groups=64, act=nn.Hardswish),
            conv_bn(64, 96, k=1, act=nn.Hardswish), nn.MaxPool2d((2, 1), (2, 1)),
            conv_bn(96, 96), nn.MaxPool2d((2, 1), (2, 1)),
        )
        self.rnn = nn.LSTM(96, HIDDEN, num_layers=1, bidirectional=True)
        self.fc = nn.Linear(2 * HIDDEN, NUM_CLASSES)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)                 # (N, C, 1, W')
        b, c, h, w = x.size()
        x = x.reshape(b, c * h, w)           # Im2Seq: H is 1 here
        x = x.permute(2, 0, 1)               # (W', N, C): time-major for the LSTM
        x, _ = self.rnn(x)
        return torch.softmax(self.fc(x), dim=2)


def synthetic_text_lines(n: int, width: int, gen: np.random.Generator) -> np.ndarray:
    """Light background with dark glyph-like strokes, blurred, PaddleOCR-normalized."""
    from scipy.ndimage import gaussian_filter

    imgs = np.empty((n, 3, 32, width), dtype=np.float64)
    for i in range(n):
        bg = gen.uniform(170, 250)
        ink = gen.uniform(0, 80)
        canvas = np.full((32, width), bg)
        x = int(gen.integers(2, 8))
        while x < width - 6:
            cw = int(gen.integers(4, 9))      # glyph width
            top, bottom = int(gen.integers(6, 11)), int(gen.integers(22, 27))
            for _ in range(int(gen.integers(2, 5))):  # strokes per glyph
                if gen.random() < 0.5:   # vertical stroke
                    cx = x + int(gen.integers(0, cw))
                    canvas[top:bottom, cx:cx + 2] = ink
                else:                    # horizontal stroke
                    cy = int(gen.integers(top, bottom))
                    canvas[cy:cy + 2, x:x + cw] = ink
            x += cw + int(gen.integers(1, 6))
            if gen.random() < 0.1:        # word gap
                x += int(gen.integers(5, 12))
        canvas = gaussian_filter(canvas, 0.7) + gen.normal(0, 4, size=canvas.shape)
        tint = gen.uniform(0.9, 1.1, size=(3, 1, 1))
        imgs[i] = np.clip(canvas[None] * tint, 0, 255)
    return ((imgs / 255.0 - 0.5) / 0.5).astype(np.float32)


def _export(model: nn.Module, sample: np.ndarray, path: Path) -> None:
    with warnings.catch_warnings():
        # Both warnings are about cases that do not apply here: folding with PRESERVE is only a
        # problem for a model in training mode, and the LSTM batch-size note only when h0/c0
        # are baked for a fixed batch (the exporter builds them from the input's batch size;
        # main() checks two different batch sizes).
        warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
        warnings.filterwarnings("ignore", message=".*with a variable length with LSTM.*")
        bu.export_onnx(
            model,
            (torch.from_numpy(sample),),
            path,
            input_names=["x"],
            output_names=["probs"],
            dynamic_axes={"x": {0: "batch", 3: "width"}, "probs": {0: "time", 1: "batch"}},
            opset_version=OPSET,
            # Folding (the exporter's default) turns the LSTM gate re-ordering of the weights
            # into plain initializers; TrainingMode.PRESERVE on an eval() model skips the
            # Conv+BN fusion that the exporter does for TrainingMode.EVAL, so BN stays.
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE,
        )


def main() -> None:
    bu.setup_determinism(SEED)
    model = CRNN()
    bu.randomize_batchnorm(model, torch.Generator().manual_seed(SEED + 1), eps_every=2)
    model.eval()

    calib = synthetic_text_lines(N_CALIB, CALIB_W, np.random.default_rng(SEED))
    other = synthetic_text_lines(2, 320, np.random.default_rng(SEED + 1))  # another N and W
    with torch.no_grad():
        # A random classifier head sees LSTM features that barely vary: widen it and centre
        # it on the sample data so the per-frame class distributions are not all alike.
        nn.init.normal_(model.fc.weight, std=2.0, generator=torch.Generator().manual_seed(SEED + 2))
        feats = model.backbone(torch.from_numpy(calib))
        h, _ = model.rnn(feats.reshape(feats.size(0), -1, feats.size(3)).permute(2, 0, 1))
        model.fc.bias.copy_(-model.fc.weight @ h.reshape(-1, h.size(-1)).mean(0))
        ref = [model(torch.from_numpy(d)).numpy() for d in (calib, other)]

    onnx_path = HERE / f"{NAME}.onnx"
    _export(model, calib[:2], onnx_path)
    bu.save_npz(HERE / f"{NAME}.calib.npz", x=calib)

    outs = bu.check_model(
        onnx_path,
        {"x": calib},
        {"x": other},
        require_ops=("BatchNormalization", "LSTM", "Shape", "Gather", "Concat", "Reshape", "Softmax"),
    )
    for (got,), want in zip(outs, ref, strict=True):
        err = float(np.abs(got - want).max())
        if err > 1e-5:
            raise SystemExit(f"onnxruntime and torch disagree: max abs error {err:.2e}")
    print(f"   matches torch (max abs error <= 1e-5); calib top-1 classes used: "
          f"{len(np.unique(ref[0].argmax(-1)))}/{NUM_CLASSES}, max prob mean {ref[0].max(-1).mean():.3f}")


if __name__ == "__main__":
    main()
