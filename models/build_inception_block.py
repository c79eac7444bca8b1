"""Build models/inception_block.onnx: a small Inception-style network (random weights).

    python models/build_inception_block.py

Writes, next to this script:
    inception_block.onnx          opset 11, TorchScript exporter, BN not folded
    inception_block.calib.npz     {'image': 32 smoothed-noise images, (32, 3, 32, 32) float32}

Layout (every conv is Conv -> BatchNormalization -> Relu):

    image (N,3,32,32)
      stem: 3x3 conv 3->32, stride 1 (bias=False) -> MaxPool 2x2 -> (N,32,16,16)  = "x"
      block, four branches reading "x":
        b1: 1x1 32->16
        b2: 1x1 32->24 (with bias) -> 3x3 24->32
        b3: 1x1 32->8               -> 5x5 8->16
        b4: MaxPool 3x3 s1 p1       -> 1x1 32->16
      Concat(channels) -> (N,80,16,16) -> GlobalAveragePool -> Flatten -> Gemm 80->10 = logits

The three 1x1 convs on "x" (b1, b2, b3) have different widths and the same
attributes: the horizontal-merge case. The weights are random (seeded) but
every BatchNorm has non-trivial weight/bias/running_mean/running_var, and
every second one uses eps=1e-3 (the Keras default), so a BN fold that drops
or mis-places eps or the running stats shows up numerically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _buildutil as bu  # noqa: E402

NAME = "inception_block"
SEED = 0
OPSET = 11
N_CALIB = 32


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, bias: bool = False) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class InceptionBlock(nn.Module):
    def __init__(self, cin: int = 32) -> None:
        super().__init__()
        self.b1 = ConvBNReLU(cin, 16, 1)
        self.b2 = nn.Sequential(ConvBNReLU(cin, 24, 1, bias=True), ConvBNReLU(24, 32, 3))
        self.b3 = nn.Sequential(ConvBNReLU(cin, 8, 1), ConvBNReLU(8, 16, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBNReLU(cin, 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class InceptionNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNReLU(3, 32, 3), nn.MaxPool2d(2))
        self.block = InceptionBlock(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(80, num_classes)
        # He init (as torchvision does) keeps activations O(1) through the random network,
        # so the logits are spread out rather than nearly tied.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.1)
        nn.init.normal_(self.fc.weight, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def smoothed_noise(n: int, gen: np.random.Generator) -> np.ndarray:
    """Images with image-like spatial correlation: blurred noise plus a gradient,
    scaled to roughly zero mean / unit variance per channel (as after ImageNet
    normalization)."""
    from scipy.ndimage import gaussian_filter

    x = gen.standard_normal((n, 3, 32, 32))
    x = gaussian_filter(x, sigma=(0, 0, 2.0, 2.0), mode="reflect")
    ramp = np.linspace(-1.0, 1.0, 32)
    angle = gen.uniform(0, 2 * np.pi, size=(n, 1, 1, 1))
    x = x / x.std(axis=(2, 3), keepdims=True) + 0.5 * (np.cos(angle) * ramp[None, None, :, None]
                                                        + np.sin(angle) * ramp[None, None, None, :])
    x = x + gen.normal(0, 0.3, size=(n, 3, 1, 1))  # per-image colour shift
    return x.astype(np.float32)


def main() -> None:
    bu.setup_determinism(SEED)
    model = InceptionNet()
    bu.randomize_batchnorm(model, torch.Generator().manual_seed(SEED + 1), eps_every=2)
    model.eval()

    data = smoothed_noise(N_CALIB, np.random.default_rng(SEED))
    with torch.no_grad():
        # Centre the classifier on the sample data: the pooled ReLU features are all positive,
        # so with random weights a couple of classes would win for every input.
        feats = torch.flatten(model.pool(model.block(model.stem(torch.from_numpy(data)))), 1)
        model.fc.bias.copy_(-model.fc.weight @ feats.mean(0))
        torch_out = model(torch.from_numpy(data)).numpy()

    onnx_path = HERE / f"{NAME}.onnx"
    bu.export_onnx(
        model,
        (torch.zeros(1, 3, 32, 32),),
        onnx_path,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,  # model is in eval(); no Conv+BN peephole
    )
    bu.save_npz(HERE / f"{NAME}.calib.npz", image=data)

    (ort_out,), _ = bu.check_model(
        onnx_path,
        {"image": data},
        {"image": data[:1]},
        require_ops=("BatchNormalization", "Concat", "GlobalAveragePool", "MaxPool"),
    )
    err = float(np.abs(ort_out - torch_out).max())
    print(f"max |logit difference| onnxruntime vs torch: {err:.2e}; logits std {torch_out.std():.3f}")
    if err > 1e-4 * max(1.0, float(np.abs(torch_out).max())):
        raise SystemExit("onnxruntime and torch disagree")


if __name__ == "__main__":
    main()
