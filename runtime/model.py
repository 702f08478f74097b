"""`LlamaForCausalLM`: the Llama-family decoder (Llama 2/3, TinyLlama, Mistral, Qwen2, Qwen3) over a KV cache.

Parameter names are exactly Hugging Face's, so a snapshot of a HF checkpoint binds to a model built
on the meta device with `kold.snapshot.load_into` (no allocation, no copy); `build_model` does the
three steps (meta build, load_into, materialize_buffers) for a restored snapshot.

Numerics follow transformers' implementation so greedy generations match it token for token:
RMSNorm in fp32, RoPE angles in fp32 (cast to the model dtype), rotate-half RoPE layout, SwiGLU,
SDPA with the 1/sqrt(head_dim) scale. Qwen3 normalises each head of q and k (`q_norm`/`k_norm`,
weights of head_dim) between the projection and RoPE, so the cache holds normalised, rotated keys.

RoPE: the only non-persistent state is `rotary_emb.inv_freq` (head_dim/2 floats); cos/sin are
computed on the fly from each row's positions (B*T*head_dim/2 angles a forward — noise next to one
matmul), so there is no max-length cos/sin cache to size or keep in sync. `inv_freq` does not come
from the snapshot, so after `load_into` it is still on the meta device: `materialize_buffers(device)`
computes it (on the CPU in fp32, as transformers does, then moves it) and checks nothing is left on meta.

Attention: every forward writes its K/V into the cache at (slot, position), then attends over the
slot's positions 0..max(positions) with an explicit boolean mask `key_pos <= query_pos` (and, with
a sliding window, `key_pos > query_pos - window`). One mask serves batched decode (each row at its
own position), a prompt continued from a cached prefix, and anything in between, and rows never see
another slot's keys or the stale tail of their own slot. A prefill from position 0 (as many tokens
as positions read) attends over its own K/V with SDPA's `is_causal` instead: the same result, and
without a mask torch may choose its flash / memory-efficient kernels, which a boolean mask rules out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn.functional import scaled_dot_product_attention, silu

from kold.runtime.config import ModelConfig
from kold.runtime.kvcache import KVCache

if TYPE_CHECKING:
    from kold.snapshot.restorer import RestoredSnapshot

# SDPA broadcasts kv heads over query heads itself since torch 2.5 (no repeat_interleave copy of K/V).
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def resolve_device(device: torch.device | str) -> torch.device:
    """`device` as tensors report it: "cuda" means the current CUDA device, "cuda:N" (comparable)."""
    target = torch.device(device)
    index: int | None = target.index  # typed as int by torch, None for a bare "cuda"
    if target.type == "cuda" and index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


def tied_weights(config: ModelConfig) -> dict[str, str]:
    """`load_into(..., tied=...)` for checkpoints that store tied embeddings once (as HF saves them)."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies `[head_dim / 2]` (fp32, CPU), with `linear` or `llama3` scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths (low frequencies) are divided by `factor`, short ones kept, the band
    # between interpolated smoothly (Meta's reference implementation, as transformers computes it).
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Linear(nn.Linear):
    """`nn.Linear` without random initialisation: every weight is assigned from a snapshot.

    Skipping `reset_parameters` matters for cold starts, not just for time spent drawing random
    numbers: on the meta device `normal_`/`kaiming_uniform_` go through torch's Python meta
    decompositions, whose first use imports torch._refs, torch._decomp and sympy (~1.9 s measured
    on the tiny model). `torch.empty` on meta is a plain C++ call.
    """

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """`nn.Embedding` without random initialisation (see `Linear`)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as transformers does."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))  # always assigned from the weights
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin `[B, T, head_dim]` for given positions, from `inv_freq` (see the module docstring)."""

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)

    def materialize(self, device: torch.device) -> None:
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, heads, T, head_dim]` by the angles `[B, T, head_dim]`."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    """Grouped-query attention over the KV cache."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q_out, kv_out = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(h, q_out, bias=config.qkv_bias, dtype=dtype)
        self.k_proj = Linear(h, kv_out, bias=config.qkv_bias, dtype=dtype)
        self.v_proj = Linear(h, kv_out, bias=config.qkv_bias, dtype=dtype)
        self.o_proj = Linear(q_out, h, bias=config.o_bias, dtype=dtype)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: _Step) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        step.cache.write(self.layer_idx, step.slots, step.positions, k, v)
        if step.causal:  # a prefill from 0: the slot's positions 0..T-1 now hold exactly these K/V
            keys, values = k, v
        else:
            keys, values = step.cache.read(self.layer_idx, step.rows, step.kv_len)
        if _SDPA_GQA:
            out = scaled_dot_product_attention(
                q, keys, values, attn_mask=step.mask, is_causal=step.causal, enable_gqa=True
            )
        else:  # pragma: no cover - torch < 2.5
            groups = self.num_heads // self.num_kv_heads
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            out = scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, is_causal=step.causal)
        result: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        return result


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias, dtype=dtype)
        self.up_proj = Linear(h, i, bias=bias, dtype=dtype)
        self.down_proj = Linear(i, h, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))
        return result


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, dtype)
        self.mlp = MLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: _Step) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, step)
        result: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return result


class _Step:
    """What every layer of one forward shares: cache coordinates and the attention mask."""

    def __init__(
        self, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor, kv_len: int, window: int | None
    ) -> None:
        self.cache = cache
        self.slots = slots
        self.positions = positions
        self.kv_len = kv_len
        t = positions.shape[1]
        # As many tokens as positions read: a prefill from position 0 (see `forward`), causal inside
        # itself, and no window cuts it when it is no longer than the window.
        self.causal = t == kv_len and t > 1 and (window is None or t <= window)
        # One row on the CPU reads its slot as a view. Elsewhere `int(slots[0])` would wait for the
        # device in every forward, so the row is gathered like a batch's (see KVCache.read).
        self.rows: int | torch.Tensor = int(slots[0]) if slots.numel() == 1 and slots.device.type == "cpu" else slots
        self.mask: torch.Tensor | None = None
        if not self.causal:
            key_pos = torch.arange(kv_len, device=positions.device)
            query_pos = positions[:, :, None]
            mask = key_pos <= query_pos
            if window is not None:
                mask &= key_pos > query_pos - window
            self.mask = mask[:, None]  # [B, 1, T, kv_len]: one mask for every head


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head; `forward` implements the contract in runtime/README.md."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype or config.torch_dtype
        self.model = LlamaModel(config, self.dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=self.dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Called with a stage (0: embeddings, i + 1: layer i, L + 1: norm and head) before the forward
        # reads that stage's weights, while they may still be landing (runtime/early.py); None after.
        self.gate: Callable[[int], None] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def materialize_buffers(self, device: torch.device | str | None = None) -> LlamaForCausalLM:
        """Compute the non-persistent buffers (RoPE) on `device` (default: the weights' device).

        Call after `load_into`; raises if any parameter or buffer is still on the meta device.
        """
        target = resolve_device(device) if device is not None else self.device
        keys = self.state_dict(keep_vars=True).keys()
        persistent = [*self.named_parameters(), *((n, b) for n, b in self.named_buffers() if n in keys)]
        for name, tensor in persistent:
            if tensor.device.type == "meta":
                raise RuntimeError(f"{name} is still on the meta device (load the weights first)")
            if tensor.device != target:
                raise RuntimeError(f"{name} is on {tensor.device}, not on {target}")
        self.model.rotary_emb.materialize(target)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        *,
        kv_len: int | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits `[B, T, vocab]` (`[B, 1, vocab]` with last_only) in the model dtype.

        input_ids, positions: `[B, T]`; slots: `[B]`. K/V of these tokens are written to the cache at
        (slots[b], positions[b, t]); each row attends to its slot's positions 0..its position. A call
        with T == kv_len is a prefill from position 0 (positions 0..T-1 in every row): it attends
        causally over its own K/V.
        kv_len: how many cache positions to read (default max(positions) + 1, which costs a device sync
        on GPU; the engine knows it on the host). last_only: project only the last position (a
        prefill needs one next-token distribution, and T x vocab logits is the largest tensor of it).
        """
        if input_ids.shape != positions.shape or input_ids.dim() != 2 or slots.shape != input_ids.shape[:1]:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, positions {tuple(positions.shape)} and slots "
                f"{tuple(slots.shape)} must be [B, T], [B, T] and [B]"
            )
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        x = self._decoder(input_ids, positions, _Step(cache, slots, positions, kv_len, self.config.sliding_window))
        if last_only:
            x = x[:, -1:]
        logits: torch.Tensor = self.lm_head(self.model.norm(x))
        return logits

    def _decoder(self, input_ids: torch.Tensor, positions: torch.Tensor, step: _Step) -> torch.Tensor:
        """Embeddings and every decoder layer, before the final norm; each layer waits at the gate for
        its weights (serving behind the restore), and the head's weights are waited for at the end."""
        gate = self.gate
        if gate is not None:
            gate(0)
        x: torch.Tensor = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            if gate is not None:
                gate(i + 1)
            x = layer(x, rope, step)
        if gate is not None:
            gate(len(self.model.layers) + 1)
        return x

    def final_hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final norm's output `[B, T, hidden]` (what the LM head reads), in the model dtype, for rows
        that each begin at position 0; for embeddings (runtime/embeddings.py).

        Uses no KV cache: each layer's K/V live only for that layer's attention, so this reads the
        weights and nothing else the engine's scheduler thread writes, and may run in another thread
        beside its steps. Attention is causal within each row, so a row right-padded to T gives its
        first tokens exactly the states they have alone (the padding only follows them).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} must be [B, T]")
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        slots = torch.zeros(b, dtype=torch.long, device=input_ids.device)
        own = cast(KVCache, _LayerKV())  # the one KVCache method pair attention calls
        x = self._decoder(input_ids, positions, _Step(own, slots, positions, t, self.config.sliding_window))
        hidden: torch.Tensor = self.model.norm(x)
        return hidden


class _LayerKV:
    """Stands in for the KV cache in `final_hidden_states`: holds the K/V of the layer being computed,
    which its attention reads back at once (when a mask is needed: one token, or past a sliding window)."""

    def __init__(self) -> None:
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv = (k, v)

    def read(self, layer: int, rows: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.kv is not None
        return self.kv


def build_skeleton(config: ModelConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """The module tree on the meta device: no storage, no initialisation, only the config is needed.

    Split from `bind_weights` so that a cold start builds it while the restore still moves bytes.
    """
    with torch.device("meta"):
        return LlamaForCausalLM(config, dtype=dtype)


def bind_weights(
    model: LlamaForCausalLM,
    snapshot: RestoredSnapshot | Mapping[str, torch.Tensor],
    *,
    compute_dtype: torch.dtype | None = None,
) -> LlamaForCausalLM:
    """Assign the snapshot's tensors to a `build_skeleton` model (no copy), compute the RoPE buffer.

    compute_dtype: cast the weights to this dtype after binding (a copy: memory for both until the
    snapshot's buffer is released). None keeps the snapshot's dtype.
    """
    from kold.snapshot import load_into

    tensors = snapshot if isinstance(snapshot, Mapping) else snapshot.tensors
    device = tensors["model.embed_tokens.weight"].device
    load_into(model, snapshot, tied=tied_weights(model.config))
    model.materialize_buffers(device)
    if compute_dtype is not None and compute_dtype != model.dtype:
        model.to(compute_dtype)  # params are converted in place (param.data), so tied weights stay tied
        model.dtype = compute_dtype
    return model.eval()


def build_model(
    snapshot: RestoredSnapshot | Mapping[str, torch.Tensor],
    config: ModelConfig | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> LlamaForCausalLM:
    """Meta-build, bind the snapshot's tensors (no copy), compute the RoPE buffer; ready for inference.

    The model lives where the snapshot was restored (`restore(uri, device)`), in the weights' dtype
    unless `compute_dtype` says otherwise: the tensors are authoritative, config.json's `torch_dtype`
    is only a hint. `config` defaults to the snapshot's config.json (required for a plain state dict).
    """
    if isinstance(snapshot, Mapping):
        tensors: Mapping[str, torch.Tensor] = snapshot
        if config is None:
            raise ValueError("build_model: pass config= when building from a state dict")
    else:
        tensors = snapshot.tensors
        config = config or ModelConfig.from_hf(snapshot.config())
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError("build_model: the snapshot has no 'model.embed_tokens.weight' (not a Llama-family model?)")
    return bind_weights(build_skeleton(config, embed.dtype), snapshot, compute_dtype=compute_dtype)
