"""The model behind the service: the narrow interface the service uses (`Backend`), what a loader
returns (`Loaded`), and the real implementation — restore a snapshot, load its tokenizer, build the
engine (`snapshot_loader`, `EngineBackend`).

Everything heavy is imported inside the loader, which runs on a background thread after the server
listens: torch (through the engine and the model), tokenizers, jinja2.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kold.runtime.protocol import ContextLengthError, DrainingError, InvalidRequestError

if TYPE_CHECKING:
    import torch

    from kold.runtime.early import LayerGate
    from kold.runtime.engine import Engine
    from kold.runtime.kvcache import KVCache
    from kold.runtime.model import LlamaForCausalLM
    from kold.runtime.structured import Compiled, GrammarCompiler
    from kold.runtime.tokenizer import Tokenizer
    from kold.runtime.tools import ToolFamily
    from kold.snapshot.cache import NodeCache
    from kold.snapshot.hostpool import HostPool
    from kold.snapshot.manifest import Manifest
    from kold.snapshot.progress import RestoreProgress
    from kold.snapshot.store import S3Options
    from kold.snapshot.verify import TierVerifier

log = logging.getLogger(__name__)

# -- what the service needs from the engine and the tokenizer ----------------------------------------


class TokenEvent(Protocol):
    @property
    def token_id(self) -> int | None: ...
    @property
    def text_delta(self) -> str: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def logprob(self) -> float | None: ...  # when Sampling.logprobs asked for them
    @property
    def top_logprobs(self) -> Sequence[tuple[int, float]]: ...  # (token id, logprob), most likely first


class Generation(Protocol):
    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...
    def cancel(self) -> None: ...


@dataclass(frozen=True)
class Sampling:
    """One generation's settings, as the service resolved them from an OpenAI request."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: each token's, with the k most likely alternatives
    constraint: Compiled | None = None  # structured output: compiled by the backend's `grammar`


@dataclass(frozen=True)
class EngineStats:
    waiting: int  # submitted, not yet in a batch slot
    running: int  # in a batch slot
    generated_tokens: int  # since the engine started, whether or not a client read them
    prompt_tokens: int


class Backend(Protocol):
    """A loaded model: tokenizer + engine behind one narrow interface."""

    max_seq_len: int
    grammar: GrammarCompiler  # compiles structured-output constraints for this model's vocabulary
    tool_family: ToolFamily | None  # how the model writes tool calls (runtime/tools.py), None: unknown

    # may raise ContextLengthError before tokenizing, when the text's length alone says it cannot fit
    def encode(self, text: str, *, special: bool) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...  # what the token stands for in a text (logprobs)
    # `tools`: the request's tools, as the model's template takes them (runtime/tools.py)
    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str: ...
    def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str = "") -> Generation: ...
    def pending(self) -> int: ...
    def stats(self) -> EngineStats: ...
    def stop(self, drain_timeout: float) -> None: ...


@dataclass
class Loaded:
    """What a loader hands back: the model behind its interface, and where the time went."""

    backend: Backend
    restore: dict[str, Any] = field(default_factory=dict)  # RestoreStats.as_dict()
    phases: dict[str, float] = field(default_factory=dict)  # seconds by phase
    # the weights came from a cache tier unchecked: the server runs this check once serving begins
    # (VERIFY_TIERS "background") and stops serving if the tier was corrupt
    verifier: TierVerifier | None = None


# How a restore treats the node's cache tiers (KOLD_VERIFY_TIERS): "background" trusts them and checks
# the served bytes right after serving begins; "sync" checks them before serving (a pass over the
# weights on the critical path; a corrupt entry is then read from the store at once); "off" trusts them.
VERIFY_TIERS = ("background", "sync", "off")


class Loader(Protocol):
    """Loads the model in a thread. `cancel` asks it to give up. `early`, when given, may be called
    once with a backend that takes requests before the load is over (it computes behind the restore:
    runtime/early.py); the loader then returns that same backend in its `Loaded`."""

    def __call__(self, cancel: threading.Event, early: Callable[[Backend], None] | None = None) -> Loaded: ...


# -- the real one: kold's engine and tokenizer -------------------------------------------------------


class EngineBackend:
    """The service's `Backend` over kold's `Engine` and `Tokenizer`."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_seq_len = engine.max_seq_len
        from kold.runtime.structured import GrammarCompiler

        self.grammar = GrammarCompiler.for_tokenizer(tokenizer, engine.config.vocab_size, engine.eos_token_ids)
        from kold.runtime.tools import tool_family

        self.tool_family = tool_family(tokenizer.chat_template, engine.config.model_type)

    def encode(self, text: str, *, special: bool) -> list[int]:
        limit = self.max_seq_len
        # the cheap bound first: a text this long has more tokens than the context holds, whatever they
        # are, and tokenizing it would take seconds and memory for nothing (the bound is only worked
        # out, once, for a text longer than the context in tokens could be at one character a token)
        if len(text) > limit and len(text) > limit * (per_token := self.tokenizer.max_chars_per_token):
            raise ContextLengthError(
                f"this model's maximum context length is {limit} tokens, but the prompt has {len(text)} "
                f"characters: more than {limit} tokens of at most {per_token} characters each can hold"
            )
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        from kold.runtime.chat_template import ChatTemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        except ChatTemplateError as exc:
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from None

    def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str = "") -> Generation:
        """Submit one generation; `request_id` names it in the engine's log lines."""
        from kold.runtime import engine as eng
        from kold.runtime.sampling import SamplingParams

        try:
            params = SamplingParams(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=sampling.seed,
                stop=sampling.stop,
                ignore_eos=sampling.ignore_eos,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                logprobs=sampling.logprobs,
                constraint=sampling.constraint,
            )
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        try:
            return self.engine.submit(
                eng.GenerationRequest(prompt_ids=prompt_ids, params=params, request_id=request_id)
            )
        except eng.PromptTooLongError as exc:
            raise ContextLengthError(str(exc), param="prompt") from None
        except eng.InvalidRequestError as exc:
            raise InvalidRequestError(str(exc), param="prompt") from None
        except eng.EngineStoppedError as exc:
            raise DrainingError(str(exc)) from None

    def pending(self) -> int:
        return self.engine.num_waiting

    def stats(self) -> EngineStats:
        e = self.engine
        return EngineStats(e.num_waiting, e.num_running, e.tokens_generated, e.prompt_tokens_processed)

    def stop(self, drain_timeout: float) -> None:
        self.engine.stop(drain_timeout)
        self.grammar.close()


@dataclass
class _Prepared:
    """What `_Prebuild` makes without the weights: an unbound model, its KV cache, the tokenizer."""

    config_json: bytes  # compared with the restored snapshot's before the model is used
    weights_dtype: torch.dtype  # the snapshot's, which the skeleton is built in
    model: LlamaForCausalLM  # on the meta device
    cache: KVCache
    tokenizer: Tokenizer


class _Prebuild:
    """Everything a cold start needs that does not depend on the weights, done beside the restore.

    The restore of a 1b model takes seconds; the model skeleton (meta device, no initialisation), the
    KV cache (hundreds of MB) and the tokenizer need only the snapshot's config.json, its tokenizer
    files and the weights' dtype. The restore hands those over as soon as it has read them (its
    `on_metadata`, before any data: no second read), and this thread builds from them as soon as
    torch is imported, so that after the restore only `bind_weights` (assigning views) is left. A
    failure here is not fatal: the loader then builds after the restore as before, and a real
    problem with the snapshot is reported by the restore or by that build.
    """

    def __init__(
        self,
        *,
        device: str,
        max_batch: int,
        max_seq_len: int | None,
        dtype: str | None,
        progress: RestoreProgress | None = None,
        on_early: Callable[[Backend], None] | None = None,
    ) -> None:
        self.device, self.max_batch, self.max_seq_len, self.dtype = device, max_batch, max_seq_len, dtype
        self.progress, self.on_early = progress, on_early
        self.phases: dict[str, float] = {}
        self.result: _Prepared | None = None
        self.error: BaseException | None = None
        self.early: _Early | None = None  # the engine serving behind the restore, if one was started
        self._metadata: tuple[Manifest, dict[str, bytes]] | None = None
        self._offered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kold-prebuild", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, manifest: Manifest, files: dict[str, bytes]) -> None:
        """The restore's `on_metadata`: what the build needs, as soon as the restore has it."""
        self._metadata = (manifest, files)
        self._offered.set()

    def abandon(self) -> None:
        """The restore ended without offering its metadata (it failed): stop waiting for it."""
        self._offered.set()

    def join(self) -> _Prepared | None:
        self._thread.join()
        return self.result

    def _run(self) -> None:
        try:
            self.result = self._build()
        except BaseException as exc:  # the loader logs it and builds after the restore
            self.error = exc
            return
        if self.progress is not None and self.on_early is not None:
            try:
                self.early = self._serve_early(self.result, self.progress, self.on_early)
            except Exception:  # never fatal: the loader binds after the restore as usual
                log.warning("could not serve behind the restore; serving after it", exc_info=True)

    def _serve_early(
        self, prepared: _Prepared, progress: RestoreProgress, on_early: Callable[[Backend], None]
    ) -> _Early | None:
        """Bind the model to the restore's host buffer while it fills, gate its forward on what has
        landed (runtime/early.py), start the engine and hand it over: requests run from now on."""
        compute = parse_dtype(self.dtype)
        if compute is not None and compute != prepared.weights_dtype:
            return None  # a dtype conversion reads every weight: it has to wait for all of them
        got = progress.wait_destination()
        if got is None or progress.ended:  # a GPU or shm-tier restore, a failed one, or already done
            return None
        from kold.runtime.early import LayerGate
        from kold.runtime.engine import Engine
        from kold.runtime.model import bind_weights
        from kold.snapshot.devices import host_tensor
        from kold.snapshot.restorer import tensor_views

        t = time.perf_counter()
        manifest, buffer = got
        model = bind_weights(prepared.model, tensor_views(host_tensor(buffer, manifest.data_size), manifest))
        gate = LayerGate(model, manifest, progress)
        model.gate = gate
        engine = Engine(
            model, prepared.tokenizer, model.config, max_batch=self.max_batch, max_seq_len=self.max_seq_len,
            cache=prepared.cache,
        )  # fmt: skip
        engine.start()
        backend = EngineBackend(engine, prepared.tokenizer)
        self.phases["early_bind"] = time.perf_counter() - t
        early = _Early(engine, backend, gate)
        try:
            on_early(backend)
        except BaseException:
            engine.stop(0.0)
            raise
        return early

    def _wait_metadata(self) -> tuple[dict[str, bytes], str]:
        """The snapshot's small files and the weights' dtype name."""
        self._offered.wait()
        if self._metadata is None:
            raise RuntimeError("the restore ended before it read the snapshot's metadata")
        manifest, files = self._metadata
        embed = [t.dtype for t in manifest.tensors if t.name == EMBED]
        if not embed:
            raise ValueError(f"the snapshot has no {EMBED!r} (not a Llama-family model?)")
        return files, embed[0]

    def _build(self) -> _Prepared:
        from kold.runtime.config import ModelConfig, context_length
        from kold.snapshot import dtypes

        started = time.perf_counter()
        files, dtype_name = self._wait_metadata()
        config = ModelConfig.from_hf(json.loads(files.get("config.json") or b"{}"))
        t = time.perf_counter()
        from kold.runtime.tokenizer import Tokenizer  # tokenizers + jinja2: no torch, so before waiting for it

        tokenizer = Tokenizer.from_files(files)
        self.phases["tokenizer"] = time.perf_counter() - t
        t = time.perf_counter()
        from kold.runtime.kvcache import KVCache
        from kold.runtime.model import build_skeleton, resolve_device

        self.phases["prebuild_import_wait"] = time.perf_counter() - t  # mostly torch's import, begun at start
        t = time.perf_counter()
        weights_dtype = dtypes.to_torch(dtypes.by_name(dtype_name))
        model = build_skeleton(config, weights_dtype)
        compute = parse_dtype(self.dtype) or weights_dtype
        max_seq_len = context_length(config, self.max_seq_len)
        cache = KVCache(config, self.max_batch, max_seq_len, compute, resolve_device(self.device))
        self.phases["skeleton"] = time.perf_counter() - t
        self.phases["prebuild"] = time.perf_counter() - started
        return _Prepared(files.get("config.json", b""), weights_dtype, model, cache, tokenizer)


@dataclass
class _Early:
    engine: Engine
    backend: EngineBackend
    gate: LayerGate


EMBED = "model.embed_tokens.weight"
DTYPES = ("auto", "bfloat16", "float32", "float16")


def parse_dtype(name: str | None) -> torch.dtype | None:
    """`--dtype`: None or "auto" -> None (keep the snapshot's dtype); else the torch dtype of that name."""
    import torch

    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (one of {', '.join(DTYPES)})")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def snapshot_loader(
    uri: str,
    *,
    device: str = "cpu",
    max_batch: int = 8,
    max_seq_len: int | None = None,
    cache: NodeCache | None = None,
    s3: S3Options | None = None,
    readers: int | None = None,
    dtype: str | None = None,
    pool: HostPool | None = None,
    verify_tiers: str = "background",
) -> Loader:
    """A loader (see server.py) for the snapshot at `uri`; phases are timed for the startup log.

    Phases (seconds), in the startup event (and `model`, `prebuild` in the `X-Kold-*` headers):
    `restore` (its own work) and `torch_import` run side by side; so does the prebuild — `prebuild`
    (all of it, from process start when the load is begun early), made of `prebuild_import_wait`
    (waiting for torch's import), `tokenizer` and `skeleton` (meta model + KV cache). After the
    restore, on the critical path: `model` (from the restore's end to a started engine), made of
    `prebuild_wait` (the part of the prebuild the restore did not hide), `bind` (assigning the views,
    plus a dtype conversion if `dtype` asks for one) and the engine's start.
    `dtype`: the compute dtype ("auto" or None: the snapshot's; see `DTYPES`). `pool`: the node's
    pre-faulted host memory, which a CPU restore claims instead of faulting in fresh pages.
    `verify_tiers`: one of `VERIFY_TIERS`; with "background" a restore from a cache tier hands back a
    `Loaded.verifier`.

    With `early` (the server passes it) and a CPU restore that fills a buffer, the model is bound to
    that buffer while it fills and starts serving behind the restore (runtime/early.py): `early_bind`
    is then the prebuild's binding, `early_gate_wait` how long forward passes waited for weights.
    """

    if verify_tiers not in VERIFY_TIERS:
        raise ValueError(f"unknown tier verification {verify_tiers!r} (one of {', '.join(VERIFY_TIERS)})")

    def load(cancel: threading.Event, early: Callable[[Backend], None] | None = None) -> Loaded:
        phases: dict[str, float] = {}

        # torch's import (~1.5-2 s on a small machine) and the restore overlap: the restore's readers
        # move bytes into a host buffer without torch (they release the GIL in every read), and only
        # its last step, making tensor views, waits for the import to finish (Python's per-module
        # import lock makes the two threads agree). A no-op when torch is imported already.
        def import_torch() -> None:
            t0 = time.perf_counter()
            import torch  # noqa: F401

            phases["torch_import"] = time.perf_counter() - t0

        importer = threading.Thread(target=import_torch, name="kold-import-torch", daemon=True)
        importer.start()
        from kold.snapshot import RestoreProgress, restore

        progress = RestoreProgress() if early is not None and device == "cpu" else None
        prebuild = _Prebuild(device=device, max_batch=max_batch, max_seq_len=max_seq_len, dtype=dtype,
                             progress=progress, on_early=early)  # fmt: skip
        prebuild.start()
        try:
            snap = restore(uri, device, cache=cache, s3=s3, readers=readers, cancel=cancel,
                           verify=True if verify_tiers == "sync" else None,
                           on_metadata=prebuild.offer, progress=progress, pool=pool)  # fmt: skip
        except BaseException:
            prebuild.abandon()
            prebuild.join()
            if prebuild.early is not None:  # its requests already failed at the gate
                prebuild.early.engine.stop(0.0)
            raise
        prebuild.abandon()  # a no-op once the metadata was offered; else the prebuild ends at once
        phases["restore"] = snap.stats.total_s - snap.stats.import_wait_s
        verifier = None
        if verify_tiers == "background":
            from kold.snapshot.verify import TierVerifier

            verifier = TierVerifier.for_restore(snap)
        importer.join()
        t = time.perf_counter()
        prepared = prebuild.join()
        phases["prebuild_wait"] = time.perf_counter() - t
        phases.update(prebuild.phases)
        if prebuild.early is not None:  # already serving: every byte has landed, the gate can go
            served = prebuild.early
            served.engine.model.gate = None
            phases["early_gate_wait"] = served.gate.waited_s
            phases["model"] = time.perf_counter() - t
            return Loaded(served.backend, restore=snap.stats.as_dict(), phases=phases, verifier=verifier)
        from kold.runtime.engine import Engine
        from kold.runtime.model import bind_weights
        from kold.runtime.tokenizer import Tokenizer

        compute = parse_dtype(dtype)
        embed = snap.tensors.get(EMBED)
        if (
            prepared is not None
            and embed is not None
            and prepared.config_json == snap.files.get("config.json", b"")
            and prepared.weights_dtype == embed.dtype
        ):
            b = time.perf_counter()
            model = bind_weights(prepared.model, snap, compute_dtype=compute)
            phases["bind"] = time.perf_counter() - b
            engine = Engine(
                model, prepared.tokenizer, model.config, max_batch=max_batch, max_seq_len=max_seq_len,
                cache=prepared.cache,
            )  # fmt: skip
            tokenizer = prepared.tokenizer
        else:  # the prebuild failed or saw other metadata than the restore: build after the restore
            if prebuild.error is not None:
                log.warning("building beside the restore failed (%s); building after it", prebuild.error)
            b = time.perf_counter()
            tokenizer = Tokenizer.from_files(snap.files)
            phases["tokenizer"] = time.perf_counter() - b
            engine = Engine.from_snapshot(
                snap, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, compute_dtype=compute
            )
        engine.start()
        phases["model"] = time.perf_counter() - t
        stats: dict[str, Any] = snap.stats.as_dict()
        return Loaded(EngineBackend(engine, tokenizer), restore=stats, phases=phases, verifier=verifier)

    return load
