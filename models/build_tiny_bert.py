"""Build models/tiny_bert.onnx (opset 14) and models/tiny_bert_opset17.onnx (random weights).

    python models/build_tiny_bert.py

Writes, next to this script:
    tiny_bert.onnx                opset 14: LayerNorm decomposed (ReduceMean/Sub/Pow/Sqrt/Div...)
    tiny_bert_opset17.onnx        opset 17: native LayerNormalization
    tiny_bert.calib.npz           {'input_ids': (16,16) int64, 'attention_mask': (16,16) int64}

A BERT-style encoder written like Hugging Face's BertModel, so the export has
the same structure: word + position + token-type embeddings (position ids and
token-type ids are sliced from buffers with the dynamic sequence length),
LayerNorm, 2 encoder layers with SEPARATE query/key/value nn.Linear projections
(hidden 64, 4 heads of 16), additive attention mask (1 - mask) * -10000,
softmax, output projection + residual + LayerNorm, FFN 64->256->64 with exact
(erf) GELU + residual + LayerNorm, and a tanh pooler on the first token.
Both batch and sequence are dynamic; the head split/merge uses
x.size()[:-1] + (heads, head_dim) views, which the TorchScript exporter turns
into Shape/Gather/Unsqueeze/Concat/Reshape chains.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _buildutil as bu  # noqa: E402

NAME = "tiny_bert"
SEED = 0
VOCAB = 1000
HIDDEN = 64
HEADS = 4
LAYERS = 2
FFN = 256
MAX_POS = 128
TYPE_VOCAB = 2
LN_EPS = 1e-12
PAD_ID, CLS_ID, SEP_ID = 0, 1, 2
N_CALIB, SEQ = 16, 16


class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(MAX_POS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(TYPE_VOCAB, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.dropout = nn.Dropout(0.1)
        self.register_buffer("position_ids", torch.arange(MAX_POS).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, MAX_POS, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_length = input_ids.size(1)
        position_ids = self.position_ids[:, :seq_length]
        token_type_ids = self.token_type_ids[:, :seq_length].expand(input_ids.size(0), seq_length)
        x = (self.word_embeddings(input_ids)
             + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads = HEADS
        self.head_dim = HIDDEN // HEADS
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)
        self.dropout = nn.Dropout(0.1)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size()[:-1] + (self.num_heads, self.head_dim))
        return x.permute(0, 2, 1, 3)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.query(h))
        k = self.split_heads(self.key(h))
        v = self.split_heads(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = self.dropout(torch.softmax(scores + mask, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (HIDDEN,))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = SelfAttention()
        self.attention_output = nn.Linear(HIDDEN, HIDDEN)
        self.attention_LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.intermediate = nn.Linear(HIDDEN, FFN)
        self.output = nn.Linear(FFN, HIDDEN)
        self.output_LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.dropout = nn.Dropout(0.1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.dropout(self.attention_output(self.attention(h, mask)))
        h = self.attention_LayerNorm(a + h)
        f = self.dropout(self.output(nn.functional.gelu(self.intermediate(h))))
        return self.output_LayerNorm(f + h)


class TinyBert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = Embeddings()
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.pooler = nn.Linear(HIDDEN, HIDDEN)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # BERT's initializer_range=0.02, plus non-trivial LN/bias
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02 * 5)  # wider than 0.02 so attention is not uniform
            nn.init.normal_(m.bias, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.5)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(std=0.05)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        # Hugging Face's get_extended_attention_mask, classic BERT constant.
        ext = attention_mask[:, None, None, :].to(dtype=torch.float32)
        ext = (1.0 - ext) * -10000.0
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, ext)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return h, pooled


def sample_batch(n: int, seq: int, gen: np.random.Generator) -> dict[str, np.ndarray]:
    """[CLS] tok ... tok [SEP] [PAD]...: random token ids, random lengths (some full, most padded)."""
    ids = np.full((n, seq), PAD_ID, dtype=np.int64)
    mask = np.zeros((n, seq), dtype=np.int64)
    lengths = gen.integers(5, seq + 1, size=n)
    lengths[:2] = seq  # at least two unpadded rows
    for i, length in enumerate(lengths):
        ids[i, 0] = CLS_ID
        ids[i, 1:length - 1] = gen.integers(3, VOCAB, size=length - 2)
        ids[i, length - 1] = SEP_ID
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def export(model: nn.Module, path: Path, opset: int) -> None:
    dummy = sample_batch(2, 8, np.random.default_rng(123))
    bu.export_onnx(
        model,
        (torch.from_numpy(dummy["input_ids"]), torch.from_numpy(dummy["attention_mask"])),
        path,
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state", "pooler_output"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"},
            "pooler_output": {0: "batch"},
        },
        opset_version=opset,
        # The exporter's default, as transformers/optimum exports use: weight transposes are
        # folded into MatMul initializers; the Shape chains of the dynamic axes stay.
        do_constant_folding=True,
    )


def main() -> None:
    bu.setup_determinism(SEED)
    model = TinyBert().eval()
    calib = sample_batch(N_CALIB, SEQ, np.random.default_rng(SEED))
    other = sample_batch(3, 37, np.random.default_rng(SEED + 1))  # another batch and length
    with torch.no_grad():
        ref = {k: [t.numpy() for t in model(*(torch.from_numpy(v) for v in feed.values()))]
               for k, feed in (("calib", calib), ("other", other))}

    bu.save_npz(HERE / f"{NAME}.calib.npz", **calib)
    for fname, opset, required in (
        (f"{NAME}.onnx", 14, ("ReduceMean", "Erf", "Softmax", "Shape", "Gather", "Concat", "Reshape")),
        (f"{NAME}_opset17.onnx", 17, ("LayerNormalization", "Erf", "Softmax", "Shape", "Reshape")),
    ):
        path = HERE / fname
        export(model, path, opset)
        outs = bu.check_model(path, calib, other, require_ops=required)
        for key, got in zip(("calib", "other"), outs, strict=True):
            for name, g, r in zip(("last_hidden_state", "pooler_output"), got, ref[key], strict=True):
                err = float(np.abs(g - r).max())
                if err > 1e-4:
                    raise SystemExit(f"{fname}: {name} differs from torch on {key} data by {err:.2e}")
        print("   matches torch (max abs error <= 1e-4) on both batches")
    lhs = ref["calib"][0]
    print(f"last_hidden_state std {lhs.std():.3f}; padded positions in calib: "
          f"{int((calib['attention_mask'] == 0).sum())}/{calib['attention_mask'].size}")


if __name__ == "__main__":
    main()
