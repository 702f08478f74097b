"""The model behind the service: the narrow interface the service uses (`Backend`), what a loader
returns (`Loaded`), and the real implementation — restore a snapshot, load its tokenizer, build the
engine (`snapshot_loader`, `EngineBackend`).

Everything heavy is imported inside the loader, which runs on a background thread after the server
listens: torch (through the engine and the model), tokenizers, jinja2.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kold.runtime.protocol import ContextLengthError, DrainingError, InvalidRequestError

if TYPE_CHECKING:
    from kold.runtime.engine import Engine
    from kold.runtime.tokenizer import Tokenizer
    from kold.snapshot.cache import NodeCache
    from kold.snapshot.store import S3Options


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


class Generation(Protocol):
    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...
    def cancel(self) -> None: ...


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineStats:
    waiting: int  # submitted, not yet in a batch slot
    running: int  # in a batch slot
    generated_tokens: int  # since the engine started, whether or not a client read them
    prompt_tokens: int


class Backend(Protocol):
    """A loaded model: tokenizer + engine behind one narrow interface."""

    max_seq_len: int

    def encode(self, text: str, *, special: bool) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def chat_prompt(self, messages: list[dict[str, str]]) -> str: ...
    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Generation: ...
    def pending(self) -> int: ...
    def stats(self) -> EngineStats: ...
    def stop(self, drain_timeout: float) -> None: ...


@dataclass
class Loaded:
    """What a loader hands back: the model behind its interface, and where the time went."""

    backend: Backend
    restore: dict[str, Any] = field(default_factory=dict)  # RestoreStats.as_dict()
    phases: dict[str, float] = field(default_factory=dict)  # seconds by phase


Loader = Callable[[threading.Event], Loaded]  # runs in a thread; the event asks it to give up


# -- the real one: kold's engine and tokenizer -------------------------------------------------------


class EngineBackend:
    """The service's `Backend` over kold's `Engine` and `Tokenizer`."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_seq_len = engine.max_seq_len

    def encode(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        from kold.runtime.chat_template import ChatTemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from None

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Generation:
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
            )
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        try:
            return self.engine.submit(eng.GenerationRequest(prompt_ids=prompt_ids, params=params))
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


def snapshot_loader(
    uri: str,
    *,
    device: str = "cpu",
    max_batch: int = 8,
    max_seq_len: int | None = None,
    cache: NodeCache | None = None,
    s3: S3Options | None = None,
    readers: int | None = None,
) -> Loader:
    """A loader (see server.py) for the snapshot at `uri`; phases are timed for the startup log."""

    def load(cancel: threading.Event) -> Loaded:
        phases: dict[str, float] = {}

        # torch's import (~1.5-2 s on a small machine) and the restore overlap: the restore's readers
        # move bytes into a host buffer without torch (they release the GIL in every read), and only
        # its last step, making tensor views, waits for the import to finish (Python's per-module
        # import lock makes the two threads agree).
        def import_torch() -> None:
            t0 = time.perf_counter()
            import torch  # noqa: F401

            phases["torch_import"] = time.perf_counter() - t0

        importer = threading.Thread(target=import_torch, name="kold-import-torch", daemon=True)
        importer.start()
        from kold.snapshot import restore

        snap = restore(uri, device, cache=cache, s3=s3, readers=readers, cancel=cancel)
        phases["restore"] = snap.stats.total_s - snap.stats.import_wait_s
        importer.join()
        t = time.perf_counter()
        from kold.runtime.engine import Engine
        from kold.runtime.tokenizer import Tokenizer

        phases["runtime_import"] = time.perf_counter() - t
        t = time.perf_counter()
        tokenizer = Tokenizer.from_files(snap.files)
        phases["tokenizer"] = time.perf_counter() - t
        t = time.perf_counter()
        engine = Engine.from_snapshot(snap, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
        engine.start()
        phases["model"] = time.perf_counter() - t
        stats: dict[str, Any] = snap.stats.as_dict()
        return Loaded(EngineBackend(engine, tokenizer), restore=stats, phases=phases)

    return load
