"""The cold-start path of the loader: the model skeleton, KV cache and tokenizer are built beside the
restore (`backend._Prebuild`) and bound to the weights after it; a failed prebuild falls back to the
sequential build; `--dtype` converts after binding. Speed is the benchmark's business
(bench/coldstart.py); these tests check that the faster path computes the same thing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from kold.runtime import backend
from kold.runtime.backend import EngineBackend, Sampling, parse_dtype, snapshot_loader
from kold.runtime.engine import Engine
from kold.runtime.kvcache import KVCache
from kold.runtime.model import bind_weights, build_model, build_skeleton
from kold.snapshot import restore

pytestmark = pytest.mark.timeout(120)


def generate(loaded: backend.Loaded, prompt: str, n: int = 4) -> list[int]:
    """Greedy token ids from a loaded backend (no event loop: the handle is iterated synchronously)."""
    b = loaded.backend
    assert isinstance(b, EngineBackend)
    handle = b.generate(b.encode(prompt, special=True), Sampling(max_tokens=n, temperature=0.0, ignore_eos=True))
    ids = [e.token_id for e in handle if e.token_id is not None]  # type: ignore[attr-defined]
    return ids


def test_loader_builds_beside_the_restore_and_matches_the_sequential_build(tiny_snapshot: str) -> None:
    loaded = snapshot_loader(tiny_snapshot, max_batch=2, max_seq_len=64)(threading.Event())
    try:
        phases = loaded.phases
        # the prebuild ran (beside the restore) and only the bind was left after it
        assert {"prebuild", "skeleton", "tokenizer", "bind", "model", "restore", "torch_import"} <= set(phases)
        b = loaded.backend
        assert isinstance(b, EngineBackend)
        assert b.engine.cache.num_slots == 2 and b.engine.cache.max_seq_len == 64
        snap = restore(tiny_snapshot)
        reference = Engine(build_model(snap), b.tokenizer, max_batch=2, max_seq_len=64)
        reference.start()
        try:
            ref = EngineBackend(reference, b.tokenizer)
            expected = generate(backend.Loaded(ref), "The weights of a cold function")
        finally:
            reference.stop(0)
        assert generate(loaded, "The weights of a cold function") == expected
    finally:
        loaded.backend.stop(0)


def test_a_failed_prebuild_falls_back_to_building_after_the_restore(
    tiny_snapshot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object) -> None:
        raise OSError("metadata unreadable")

    monkeypatch.setattr(backend._Prebuild, "_wait_metadata", broken)
    loaded = snapshot_loader(tiny_snapshot, max_batch=1, max_seq_len=32)(threading.Event())
    try:
        assert "bind" not in loaded.phases and "prebuild" not in loaded.phases and "tokenizer" in loaded.phases
        assert len(generate(loaded, "hello", 3)) == 3
    finally:
        loaded.backend.stop(0)


def test_dtype_option_converts_after_binding(tiny_snapshot: str) -> None:
    loaded = snapshot_loader(tiny_snapshot, max_batch=1, max_seq_len=32, dtype="float32")(threading.Event())
    try:
        b = loaded.backend
        assert isinstance(b, EngineBackend)
        assert b.engine.model.dtype == torch.float32 and b.engine.cache.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in b.engine.model.parameters())
        assert len(generate(loaded, "hello", 3)) == 3
    finally:
        loaded.backend.stop(0)


def test_bind_weights_casts_and_keeps_ties(tmp_path: Path) -> None:
    from kold.modelgen import write_random_model
    from kold.runtime.config import ModelConfig
    from kold.snapshot import build_snapshot

    model_dir = write_random_model(tmp_path / "m", "llama", "tiny", dtype=torch.bfloat16, seed=4)
    snap = restore(build_snapshot(model_dir, (tmp_path / "store").as_uri(), chunk_size=64 << 10).uri)
    config = ModelConfig.from_hf(snap.config())
    skeleton = build_skeleton(config, torch.bfloat16)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    bf16 = build_model(snap)
    fp32 = bind_weights(build_skeleton(config, torch.bfloat16), snap, compute_dtype=torch.float32)
    assert fp32.dtype == torch.float32
    for (name, a), (_, b) in zip(bf16.named_parameters(), fp32.named_parameters(), strict=True):
        assert b.dtype == torch.float32 and torch.equal(a.float(), b), name  # bf16 -> fp32 is exact
    if config.tie_word_embeddings:
        assert fp32.lm_head.weight is fp32.model.embed_tokens.weight


def test_engine_takes_a_cache_allocated_ahead_and_checks_it(tiny_snapshot: str) -> None:
    snap = restore(tiny_snapshot)
    model = build_model(snap)
    from kold.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_files(snap.files)
    cache = KVCache(model.config, 2, 48, model.dtype, "cpu")
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=48, cache=cache)
    assert engine.cache is cache
    with pytest.raises(ValueError, match="KV cache"):
        Engine(model, tokenizer, max_batch=3, max_seq_len=48, cache=cache)
    with pytest.raises(ValueError, match="KV cache"):
        Engine(model, tokenizer, max_batch=2, max_seq_len=48, cache=KVCache(model.config, 2, 48, torch.float16))


def test_parse_dtype() -> None:
    assert parse_dtype(None) is None and parse_dtype("auto") is None
    assert parse_dtype("float32") == torch.float32 and parse_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype"):
        parse_dtype("int8")
