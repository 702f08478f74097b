"""Prefill and decode tokens/s of kold's model on a device, as the runtime's engine calls it.

    python bench/gpu_tokens.py --model bench/out/1b/model [--device cuda] [--steps 64]

The model is built from the checkpoint's safetensors in its own dtype (bf16 for the generated models)
and called as the engine calls it: the slots and positions on the device, `kv_len` from the host.

- prefill: one sequence of T tokens from position 0, which attends with SDPA's `is_causal` (no mask:
  torch may pick its flash / memory-efficient kernels). The same prompt through the masked path
  (one more cache position read than written, masked out) is timed beside it: what `is_causal` buys.
- decode: B sequences (prompts of 128 tokens) decoded together, `--steps` steps, the next tokens
  chosen on the device (greedy) so nothing waits for the host between steps.

Medians of 5 timed calls after 2 warm-ups; on CUDA every timing ends with a synchronize. Prints a
table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], object], sync: Callable[[], None], runs: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


DECODE_START = 128  # each decoded sequence's prompt


def decode_rate(
    model: Any, config: Any, batch: int, steps: int, limit: int, sync: Callable[[], None]
) -> tuple[float, int, float]:
    """(tokens/s, steps, seconds) of `steps` batched decode steps after a prompt of DECODE_START tokens."""
    import torch

    from kold.runtime.kvcache import KVCache

    device = model.device
    cache = KVCache(config, batch, limit, model.dtype, device)
    slots = torch.arange(batch, device=device)
    prompt = torch.randint(3, config.vocab_size, (batch, DECODE_START), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(DECODE_START, device=device)[None].expand(batch, -1)
    logits = model(prompt.to(device), positions, cache, slots, kv_len=DECODE_START, last_only=True)
    first = logits[:, -1].argmax(-1, keepdim=True)

    def decode() -> None:
        token = first
        for i in range(steps):
            pos = torch.full((batch, 1), DECODE_START + i, device=device)
            logits = model(token, pos, cache, slots, kv_len=DECODE_START + i + 1, last_only=True)
            token = logits[:, -1].argmax(-1, keepdim=True)  # chosen on the device: no wait for the host

    seconds = timed(decode, sync, runs=3, warmup=1)
    return batch * steps / seconds, steps, seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a Hugging Face directory (config.json, safetensors)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompts", default="128,512,2000", help="prefill lengths (capped by the model's context)")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--steps", type=int, default=64, help="decode steps per timed call")
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file

    from kold.runtime.config import ModelConfig
    from kold.runtime.kvcache import KVCache
    from kold.runtime.model import build_model

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = ModelConfig.from_hf(json.loads((args.model / "config.json").read_text()))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(args.model.glob("*.safetensors")):
        state.update(load_file(str(shard), device=str(device)))
    model = build_model(state, config)
    limit = min(config.max_position_embeddings, 2048)
    prompts = sorted({min(int(n), limit - 1) for n in args.prompts.split(",")})
    batches = [int(b) for b in args.batches.split(",")]
    dtype = model.dtype
    print(f"{args.model.name}: {sum(t.numel() for t in state.values()) / 1e9:.2f} B parameters, {dtype}, on {device}")
    result: dict[str, Any] = {"device": str(device), "dtype": str(dtype), "prefill": {}, "decode": {}}
    gen = torch.Generator().manual_seed(0)

    with torch.inference_mode():
        for n in prompts:
            cache = KVCache(config, 1, limit, dtype, device)
            ids = torch.randint(3, config.vocab_size, (1, n), generator=gen).to(device)
            positions = torch.arange(n, device=device)[None]
            slot = torch.tensor([0], device=device)
            causal = timed(lambda: model(ids, positions, cache, slot, kv_len=n, last_only=True), sync)  # noqa: B023
            masked = timed(lambda: model(ids, positions, cache, slot, kv_len=n + 1, last_only=True), sync)  # noqa: B023
            result["prefill"][n] = {"causal_s": causal, "masked_s": masked, "tokens_per_s": n / causal}
            print(f"prefill {n:5d} tokens: {n / causal:10.0f} tok/s ({causal * 1000:7.2f} ms; "
                  f"masked path {masked * 1000:7.2f} ms, {masked / causal:.2f}x)")  # fmt: skip
        for b in batches:
            rate, steps, seconds = decode_rate(model, config, b, min(args.steps, limit - DECODE_START - 1), limit, sync)
            result["decode"][b] = {"steps": steps, "seconds": seconds, "tokens_per_s": rate}
            print(f"decode  batch {b:3d}: {rate:10.0f} tok/s ({seconds / steps * 1000:6.2f} ms a step, {steps} steps)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
