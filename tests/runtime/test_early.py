"""Serving behind the restore (runtime/early.py): a request that arrives during a CPU restore runs
layer by layer as the weights land, computes exactly what a normal load computes, and fails cleanly
if the restore fails under it."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

from kold.runtime import backend
from kold.runtime.backend import EngineBackend, Sampling, snapshot_loader
from kold.runtime.config import ModelConfig
from kold.runtime.early import LayerGate, stage_of
from kold.runtime.kvcache import KVCache
from kold.runtime.model import LlamaForCausalLM, build_model
from kold.snapshot import RestoreProgress, build_snapshot, restore
from kold.snapshot.errors import ChunkCorruptedError
from kold.snapshot.filestore import FileReader
from kold.snapshot.store import data_key

pytestmark = pytest.mark.timeout(120)
PROMPT = "The weights of a cold function"


def generate(b: backend.Backend, n: int = 5) -> tuple[list[int], list[str | None]]:
    """Greedy ids and finish reasons (no event loop: the handle is iterated synchronously)."""
    assert isinstance(b, EngineBackend)
    handle = b.generate(b.encode(PROMPT, special=True), Sampling(max_tokens=n, temperature=0.0, ignore_eos=True))
    events = list(handle)  # type: ignore[call-overload]
    return [e.token_id for e in events if e.token_id is not None], [e.finish_reason for e in events]


def slow_reads(monkeypatch: pytest.MonkeyPatch, go: threading.Event) -> None:
    """No data moves before `go`; then each read takes a few ms, so the restore lasts a while."""
    original = FileReader.read_into

    def slow(self: FileReader, offset: int, dest: memoryview) -> int:
        go.wait(10)
        time.sleep(0.003)
        return original(self, offset, dest)

    monkeypatch.setattr(FileReader, "read_into", slow)


def small_chunk_snapshot(tiny_snapshot: str, tmp_path: Path) -> str:
    """The tiny model again, in 16 KiB chunks: many chunks, so layers land one after another."""
    snap = restore(tiny_snapshot)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name, content in snap.files.items():
        (model_dir / name).write_bytes(content)
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in snap.tensors.items()}, str(model_dir / "model.safetensors"))
    return build_snapshot(model_dir, (tmp_path / "store").as_uri(), chunk_size=16 << 10).uri


def test_a_request_runs_behind_the_restore_and_computes_what_a_normal_load_does(
    tiny_snapshot: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = small_chunk_snapshot(tiny_snapshot, tmp_path)
    normal = snapshot_loader(uri, max_batch=2, max_seq_len=64)(threading.Event())
    try:
        expected, _ = generate(normal.backend)
    finally:
        normal.backend.stop(0)

    go = threading.Event()
    slow_reads(monkeypatch, go)
    handed: list[backend.Backend] = []
    results: list[tuple[list[int], list[str | None]]] = []

    def early(b: backend.Backend) -> None:
        handed.append(b)
        worker = threading.Thread(target=lambda: results.append(generate(b)))
        worker.start()
        time.sleep(0.05)  # the request is in the engine, waiting at the gate, before any data moves
        go.set()
        handed.append(worker)  # type: ignore[arg-type]

    loaded = snapshot_loader(uri, max_batch=2, max_seq_len=64)(threading.Event(), early=early)
    try:
        assert handed and loaded.backend is handed[0]  # the early backend is the one that stays
        handed[1].join(30)  # type: ignore[attr-defined]
        assert results and results[0][0] == expected and results[0][1][-1] == "length"
        assert loaded.phases["early_gate_wait"] > 0  # the forward really waited for weights to land
        assert loaded.backend.engine.model.gate is None  # type: ignore[attr-defined]
        assert generate(loaded.backend)[0] == expected  # and keeps computing the same afterwards
    finally:
        loaded.backend.stop(0)


def test_a_restore_that_fails_under_a_running_request_fails_the_request_and_the_load(
    tiny_snapshot: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = small_chunk_snapshot(tiny_snapshot, tmp_path)
    store = Path(unquote(urlparse(uri).path)).parent.parent
    snapshot_id = uri.rsplit("/", 1)[1]
    bad = tmp_path / "bad-store"
    shutil.copytree(store, bad)
    data = bad / data_key(snapshot_id)
    size = data.stat().st_size
    with open(data, "r+b") as f:  # the last chunk (the LM head's) is corrupt in the store, for good
        f.seek(size - 100)
        f.write(b"\x55" * 50)
    go = threading.Event()
    slow_reads(monkeypatch, go)
    results: list[tuple[list[int], list[str | None]]] = []
    engines: list[EngineBackend] = []

    def early(b: backend.Backend) -> None:
        assert isinstance(b, EngineBackend)
        engines.append(b)
        worker = threading.Thread(target=lambda: results.append(generate(b)), daemon=True)
        worker.start()
        go.set()

    bad_uri = (bad / "snapshots" / snapshot_id).as_uri()
    with pytest.raises(ChunkCorruptedError):
        snapshot_loader(bad_uri, max_batch=2, max_seq_len=64)(threading.Event(), early=early)
    deadline = time.monotonic() + 30
    while not results and time.monotonic() < deadline:
        time.sleep(0.01)
    assert results and results[0][0] == [] and results[0][1][-1] in ("error", "cancelled")
    assert engines[0].engine.num_running == 0


def test_the_gate_waits_for_each_stage_in_order(tmp_path: Path) -> None:
    config = ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "torch_dtype": "float32",
    })  # fmt: skip
    torch.manual_seed(0)
    state = {k: torch.randn_like(v, device="cpu") for k, v in LlamaForCausalLM(config).state_dict().items()}
    manifest = build_snapshot(state, (tmp_path / "s").as_uri(), chunk_size=4096).manifest
    model = build_model(state, config)
    gate = LayerGate(model, manifest, RestoreProgress())
    ends = {t.name: t.end for t in manifest.tensors}
    assert gate.need == sorted(gate.need)  # monotone: a stage never waits less than the one before
    assert gate.need[0] == ends["model.embed_tokens.weight"]
    assert gate.need[2] == max(e for n, e in ends.items() if stage_of(n, 3) <= 2)  # layer 1 and all before
    assert gate.need[-1] == max(ends.values())  # the head stage needs everything
    calls: list[int] = []
    model.gate = calls.append
    ids = torch.tensor([[1, 2, 3]])
    model(ids, torch.arange(3)[None], KVCache(config, 1, 16, torch.float32), torch.tensor([0]))
    assert calls == [0, 1, 2, 3, 4]


def test_a_runtime_restoring_into_the_host_pool_serves_behind_it_from_the_segment(
    tiny_snapshot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    from kold.snapshot import HostPool

    normal = snapshot_loader(tiny_snapshot, max_batch=2, max_seq_len=64)(threading.Event())
    try:
        expected, _ = generate(normal.backend)
        data_size = normal.backend.engine.model.lm_head.weight.untyped_storage().nbytes()  # type: ignore[attr-defined]
    finally:
        normal.backend.stop(0)
    pool = HostPool(Path("/dev/shm") / f"kold-test-pool-{uuid.uuid4().hex[:8]}")
    try:
        pool.fill(1, data_size)
        handed: list[backend.Backend] = []
        go = threading.Event()  # no byte lands before the engine is handed over: a tiny restore would
        slow_reads(monkeypatch, go)  # otherwise end first on a busy machine, and nothing serves behind it

        def early(b: backend.Backend) -> None:
            handed.append(b)
            go.set()

        loaded = snapshot_loader(tiny_snapshot, max_batch=2, max_seq_len=64, pool=pool)(threading.Event(), early=early)
        try:
            assert handed and loaded.backend is handed[0]
            assert pool.segments()[0].in_use  # the weights the engine computes with live in the segment
            assert generate(loaded.backend)[0] == expected
        finally:
            loaded.backend.stop(0)
    finally:
        shutil.rmtree(pool.directory, ignore_errors=True)
