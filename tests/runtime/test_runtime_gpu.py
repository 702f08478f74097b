"""The runtime on CUDA: the model matches transformers there, and `kold runtime serve --device cuda`
restores onto the GPU and serves. The CUDA tests skip cleanly without a GPU (and, for serving,
without CuPy); the half-precision check also runs on the CPU, in every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from runtime_helpers import RuntimeProcess
from test_model import NEW_TOKENS, VARIANTS, checkpoint, hf_greedy, hf_model, prompt

from kold.runtime.config import ModelConfig
from kold.runtime.kvcache import KVCache
from kold.runtime.model import LlamaForCausalLM, tied_weights
from kold.snapshot import load_into
from kold.snapshot.devices import CUPY_HINT

# a CUDA test: marked `gpu` (the only tests allowed to skip) and skipped without a device
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")]


def on_device(
    config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str = "cuda"
) -> LlamaForCausalLM:
    """Our model in `dtype` on `device`: built in that dtype, as `load_into` checks dtypes strictly."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, dtype=dtype)
    load_into(model, {k: v.to(device, dtype) for k, v in state.items()}, tied=tied_weights(config))
    return model.materialize_buffers(device).eval()


@torch.inference_mode()
def greedy_on(model: LlamaForCausalLM, ids: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """(prefill logits, greedy tokens) through the KV cache on the model's device."""
    dev = model.device
    cache = KVCache(model.config, 2, 128, model.dtype, dev)
    slot = torch.tensor([1], device=dev)
    logits = model(torch.tensor([ids], device=dev), torch.arange(len(ids), device=dev)[None], cache, slot)
    prefill = logits.float().cpu()
    out = [int(logits[0, -1].argmax())]
    for i in range(steps - 1):
        pos = torch.tensor([[len(ids) + i]], device=dev)
        logits = model(torch.tensor([[out[-1]]], device=dev), pos, cache, slot)
        out.append(int(logits[0, -1].argmax()))
    return prefill, out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_fp32_on_cuda_matches_transformers(variant: str) -> None:
    config = ModelConfig.from_hf(VARIANTS[variant])
    reference = hf_model(VARIANTS[variant])
    ids = prompt(1)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits
    model = on_device(config, checkpoint(reference, config), torch.float32)
    assert model.device.type == "cuda"
    logits, tokens = greedy_on(model, ids, NEW_TOKENS)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert tokens == hf_greedy(reference, ids)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_fp32(dtype: torch.dtype, device: str) -> None:
    """bf16/fp16 are what a GPU serves in: the logits stay within their rounding of the fp32 ones."""
    config = ModelConfig.from_hf(VARIANTS["llama2"])
    state = checkpoint(hf_model(VARIANTS["llama2"]), config)
    full, _ = greedy_on(on_device(config, state, torch.float32, device), prompt(2), 1)
    half_model = on_device(config, state, dtype, device)
    assert half_model.dtype == dtype and half_model.device.type == device
    half, _ = greedy_on(half_model, prompt(2), 1)
    rel = float((half - full).norm() / full.norm())
    assert rel < 2e-2, f"{dtype}: relative error {rel:.3g}"
    assert torch.isfinite(half).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_serve_on_cuda(tiny_snapshot: str, tmp_path: Path) -> None:
    pytest.importorskip("cupy", reason=f"a CUDA restore needs CuPy ({CUPY_HINT})")
    process = RuntimeProcess(tiny_snapshot, tmp_path, "--device", "cuda", "--served-model-name", "tiny")
    try:
        process.wait_listening()
        body: dict[str, Any] = {"model": "tiny", "prompt": "hello", "max_tokens": 6, "temperature": 0}
        first = httpx.post(f"{process.base}/v1/completions", json=body, timeout=120)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["completion_tokens"] >= 1
        assert float(first.headers["x-kold-restore-ms"]) > 0  # the cold start's breakdown, on CUDA too
        again = httpx.post(f"{process.base}/v1/completions", json=body, timeout=60)
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]  # greedy: same text
        with httpx.stream("POST", f"{process.base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 2
        started = process.events("startup")
        assert started and started[-1]["state"] == "ready", process.output
        restore = started[-1].get("restore")
        assert isinstance(restore, dict) and str(restore.get("device")).startswith("cuda"), started[-1]
    finally:
        process.terminate()
        process.wait(60)
