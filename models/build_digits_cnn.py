"""Build models/digits_cnn.onnx: a small CNN trained on scikit-learn's 8x8 digits.

    python models/build_digits_cnn.py

Writes, next to this script:
    digits_cnn.onnx               opset 13, TorchScript exporter, BN and Dropout kept
    digits_cnn.calib.npz          {'image': 64 training samples}
    digits_cnn.test.npz           {'image': every test sample}
    digits_cnn.test_labels.npy    int64 labels of the test samples (same order)

The graph deliberately keeps what a plain export of an unoptimized model
contains: Conv -> BatchNormalization -> Relu blocks (not folded), the
Shape/Gather/Unsqueeze/Concat/Reshape chain of x.view(x.size(0), -1) (no
constant folding), and an inference-mode Dropout node with an unused mask
output. Deterministic: fixed seeds, one thread, deterministic kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _buildutil as bu  # noqa: E402

NAME = "digits_cnn"
SEED = 0
OPSET = 13
EPOCHS = 40
BATCH = 32
N_CALIB = 64


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 4 * 4, 256)
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = x.view(x.size(0), -1)  # exported as Shape/Gather/Unsqueeze/Concat/Reshape
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


def load_data():
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # pixels 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)


def train(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray) -> None:
    gen = torch.Generator().manual_seed(SEED)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i:i + BATCH]
            if len(idx) < 2:  # BatchNorm needs more than one sample per batch
                continue
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"   epoch {epoch + 1:3d}  train loss {total / len(xt):.4f}")
    model.eval()


def dropout_keep_node(g, input, p, train):
    """Export aten::dropout as an ONNX Dropout node even in inference mode.

    The TorchScript exporter drops Dropout entirely when the model is in eval
    mode. Models from other exporters and older toolchains do carry
    inference-mode Dropout nodes (with a mask output nobody reads); we keep
    one so the sample exercises the cleanup pass. training_mode is left out,
    i.e. false: the node is an identity at inference time.
    """
    from torch.onnx import symbolic_helper as sh

    ratio = g.op("Constant", value_t=torch.tensor(sh._maybe_get_const(p, "f"), dtype=torch.float32))
    out, _mask = g.op("Dropout", input, ratio, outputs=2)
    return out


def export(model: nn.Module, path: Path) -> None:
    from torch.onnx.utils import register_custom_op_symbolic, unregister_custom_op_symbolic

    register_custom_op_symbolic("::dropout", dropout_keep_node, OPSET)
    try:
        bu.export_onnx(
            model,
            (torch.zeros(1, 1, 8, 8),),
            path,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=False,  # keeps the Shape chain; also skips the Conv+BN eval peephole
            # PRESERVE with the model in eval(): BN and dropout export in inference mode, and the
            # exporter's Conv+BN fusion (run only for TrainingMode.EVAL) is not applied.
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    finally:
        unregister_custom_op_symbolic("::dropout", OPSET)


def main() -> None:
    bu.setup_determinism(SEED)
    x_train, x_test, y_train, y_test = load_data()
    print(f"digits: {len(x_train)} train / {len(x_test)} test samples")

    model = DigitsCNN()
    train(model, x_train, y_train)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    n_right = int((torch_logits.argmax(1) == y_test).sum())
    print(f"torch test accuracy: {torch_acc:.4f} ({n_right}/{len(y_test)})")

    onnx_path = HERE / f"{NAME}.onnx"
    export(model, onnx_path)

    calib = x_train[:N_CALIB].copy()
    bu.save_npz(HERE / f"{NAME}.calib.npz", image=calib)
    bu.save_npz(HERE / f"{NAME}.test.npz", image=x_test)
    bu.save_npy(HERE / f"{NAME}.test_labels.npy", y_test)

    (ort_logits,), _ = bu.check_model(
        onnx_path,
        {"image": x_test},
        {"image": calib},
        require_ops=("BatchNormalization", "Dropout", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape"),
    )
    ort_acc = float((ort_logits.argmax(1) == y_test).mean())
    max_err = float(np.abs(ort_logits - torch_logits).max())
    print(f"onnxruntime test accuracy: {ort_acc:.4f}; max |logit difference| vs torch: {max_err:.2e}")
    if ort_acc != torch_acc or not (ort_logits.argmax(1) == torch_logits.argmax(1)).all():
        raise SystemExit("onnxruntime and torch disagree on the test split")
    if torch_acc < 0.95:
        raise SystemExit(f"test accuracy {torch_acc:.4f} is below 0.95")


if __name__ == "__main__":
    main()
