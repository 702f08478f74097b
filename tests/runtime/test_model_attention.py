"""The attention paths of `LlamaForCausalLM`: a prefill from position 0 attends with SDPA's
`is_causal` over its own K/V (no mask: torch may pick its fused kernels), everything else through
the cache with an explicit mask; and a single row off the CPU never reads its slot back to the host."""

from __future__ import annotations

import pytest
import torch
from test_model import VARIANTS, checkpoint, hf_model, ours, prompt

from kold.runtime.config import ModelConfig
from kold.runtime.kvcache import KVCache
from kold.runtime.model import _Step


@pytest.mark.parametrize("variant", ["llama2", "llama3-scaled-tied", "qwen2"])
def test_a_causal_prefill_gives_the_masked_path_logits(variant: str) -> None:
    """The same prompt read as a prefill from 0 (is_causal) and through the cache with a mask (one
    more cache position read than written, masked out) gives the same logits."""
    config = ModelConfig.from_hf(VARIANTS[variant])
    model = ours(config, checkpoint(hf_model(VARIANTS[variant]), config))
    ids = torch.tensor([prompt(7)])
    n = ids.shape[1]
    with torch.inference_mode():
        causal = model(ids, torch.arange(n)[None], KVCache(config, 1, 64, torch.float32), torch.tensor([0]))
        masked = model(
            ids, torch.arange(n)[None], KVCache(config, 1, 64, torch.float32), torch.tensor([0]), kv_len=n + 1
        )
    torch.testing.assert_close(causal, masked, atol=1e-5, rtol=1e-5)


def test_which_forwards_are_causal() -> None:
    config = ModelConfig.from_hf(VARIANTS["llama2"])
    cache = KVCache(config, 2, 64, torch.float32)
    slot = torch.tensor([1])

    def step(positions: list[int], kv_len: int, window: int | None = None) -> _Step:
        return _Step(cache, slot, torch.tensor([positions]), kv_len, window)

    prefill = step(list(range(10)), 10)
    assert prefill.causal and prefill.mask is None
    assert not step([10], 11).causal  # decode
    assert not step(list(range(10, 14)), 14).causal  # a prompt continued from a cached prefix
    assert not step(list(range(10)), 10, window=4).causal  # the window cuts a prefill longer than it
    assert step(list(range(10)), 10, window=10).causal
    assert not step([0], 1).causal  # one token: nothing to mask
    assert step([10], 11).mask is not None


def test_one_row_off_the_cpu_is_not_read_back_to_the_host() -> None:
    """`int(slots[0])` on a GPU waits for the device in every forward. On the meta device (no data,
    like a GPU's from the host's side) it cannot even run: the slot must stay a tensor there."""
    config = ModelConfig.from_hf(VARIANTS["llama2"])
    cache = KVCache(config, 2, 64, torch.float32)
    on_meta = _Step(cache, torch.tensor([1], device="meta"), torch.tensor([[5]], device="meta"), 6, None)
    assert isinstance(on_meta.rows, torch.Tensor)
    on_cpu = _Step(cache, torch.tensor([1]), torch.tensor([[5]]), 6, None)
    assert on_cpu.rows == 1  # the CPU keeps the view of its slot (an int is free there)
