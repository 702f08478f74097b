"""Structured outputs: llguidance, xgrammar and outlines-core in kold's engine's batched decode loop.

    python bench/structured.py [--size small] [--batch 8] [--steps 64] [--device cpu]
                               [--libs llguidance,xgrammar,outlines-core]

The runtime uses llguidance (runtime/structured.py; pyproject says why). The other two are plugged
into the same engine through the `Compiled`/`Matcher` interface of runtime/structured.py, so that the
three are timed in the same loop: the model's forward, each constrained row's bitmask filled on the
CPU (a library's batch call where it has one) and applied to the logits, sampling, each matcher
advanced with its token. Per library:

- import_s: the library's import (xgrammar's imports transformers);
- vocab_s: the library's view of the vocabulary built once per model (each token's bytes are read
  from the tokenizer before, untimed);
- compile_ms: the compile of a 20-field JSON schema (4 strings, integers, numbers, booleans, enums
  and nested objects, all required) on a compiler with an empty cache; median over 5 schemas that
  differ in their field names, so that no cache helps;
- mask_ms: per decode step, the time the engine spends in its masking (`Engine._constrain`: fill +
  apply), median over the steps of the all-constrained run;
- decode: tokens/s of one batch of `--batch` rows decoding `--steps` tokens each: all free, half
  constrained, all constrained; `ratio` = all constrained / all free. The constrained rows follow a
  grammar that cannot end within the steps (an array of at least 1000 of the 20-field objects), so
  every row decodes exactly `--steps` tokens; the free rows ignore end-of-sequence. Best of 3 runs.

The model is a random one made by kold/modelgen.py (its real byte-level BPE tokenizer, `--size`'s
vocabulary: tiny 512, small 8192, 1b 32000), written once under bench/out/structured/. xgrammar and
outlines-core are not kold dependencies: install them beside it to compare (`pip install xgrammar
outlines-core`); a library that does not import is reported as skipped. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kold.runtime.engine import Engine, GenerationRequest
from kold.runtime.sampling import SamplingParams
from kold.runtime.structured import Compiled, Constraint, GrammarCompiler, Matcher, Vocabulary, mask_words

OUT = Path(__file__).resolve().parent / "out" / "structured"
PROMPT = "Extract the record as JSON."
MODULES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}


def schema20(tag: str) -> dict[str, Any]:
    """A 20-field object schema; `tag` renames the fields (a different schema to every compiler)."""
    kinds: list[dict[str, Any]] = [
        {"type": "string", "maxLength": 12},
        {"type": "integer", "minimum": 0, "maximum": 10000},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue"]},
        {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}, "required": ["x", "y"],
         "additionalProperties": False},
    ]  # fmt: skip
    props = {f"{tag}_field_{i}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def endless(tag: str) -> dict[str, Any]:
    """A grammar no row can finish within the steps: at least 1000 of the 20-field objects."""
    return {"type": "array", "items": schema20(tag), "minItems": 1000}


# -- the two other libraries behind runtime/structured.py's interface ---------------------------------


class _XGrammarMatcher:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def fill_mask(self, out: torch.Tensor) -> None:
        self.inner.fill_next_token_bitmask(out[None], 0)

    @staticmethod
    def fill_batch(matchers: Sequence[_XGrammarMatcher], out: torch.Tensor) -> None:
        import xgrammar

        xgrammar.BatchGrammarMatcher().batch_fill_next_token_bitmask([m.inner for m in matchers], out)

    def advance(self, token: int) -> bool:
        return bool(self.inner.accept_token(token))

    @property
    def done(self) -> bool:
        return bool(self.inner.is_terminated())

    @property
    def error(self) -> str | None:
        return None


class _XGrammarCompiled:
    def __init__(self, compiled: Any, vocab_size: int) -> None:
        self.compiled, self.vocab_size = compiled, vocab_size

    def matcher(self) -> Matcher:
        import xgrammar

        return _XGrammarMatcher(xgrammar.GrammarMatcher(self.compiled))


class _OutlinesMatcher:
    def __init__(self, guide: Any) -> None:
        self.guide = guide

    def fill_mask(self, out: torch.Tensor) -> None:
        out.zero_()
        self.guide.write_mask_into(out.data_ptr(), out.numel(), 4)

    def advance(self, token: int) -> bool:
        self.guide.advance(token, return_tokens=False)
        return True

    @property
    def done(self) -> bool:
        return False  # the end-of-sequence token ends a row: outlines allows it in a final state

    @property
    def error(self) -> str | None:
        return None


class _OutlinesCompiled:
    def __init__(self, index: Any, vocab_size: int) -> None:
        self.index, self.vocab_size = index, vocab_size

    def matcher(self) -> Matcher:
        import outlines_core

        return _OutlinesMatcher(outlines_core.Guide(self.index))


class Library:
    """One library: `setup(vocab)` once per model (timed as vocab_s), then `compile(schema)`."""

    def __init__(self, name: str, vocab: Vocabulary, vocab_size: int) -> None:
        self.name, self.vocab, self.vocab_size = name, vocab, vocab_size
        t0 = time.perf_counter()
        importlib.import_module(MODULES[name])
        self.import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._compile: Callable[[dict[str, Any]], Compiled] = getattr(self, "_" + name.replace("-", "_"))()
        self.vocab_s = time.perf_counter() - t0

    def compile(self, schema: dict[str, Any]) -> Compiled:
        return self._compile(schema)

    def _llguidance(self) -> Callable[[dict[str, Any]], Compiled]:
        vocab = self.vocab

        def compile_one(schema: dict[str, Any]) -> Compiled:
            compiler = GrammarCompiler(lambda: vocab)
            compiler._llg_tokenizer()  # the vocabulary side is vocab_s, not the compile
            return compiler.compile_sync(Constraint.json_schema(schema))

        GrammarCompiler(lambda: vocab)._llg_tokenizer()  # timed once as vocab_s
        return compile_one

    def _xgrammar(self) -> Callable[[dict[str, Any]], Compiled]:
        import xgrammar

        info = xgrammar.TokenizerInfo(
            list(self.vocab.tokens),
            vocab_type=xgrammar.VocabType.RAW,
            vocab_size=self.vocab_size,
            stop_token_ids=list(self.vocab.eos_token_ids),
        )

        def compile_one(schema: dict[str, Any]) -> Compiled:
            compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
            return _XGrammarCompiled(
                compiler.compile_json_schema(json.dumps(schema), any_whitespace=False), self.vocab_size
            )

        return compile_one

    def _outlines_core(self) -> Callable[[dict[str, Any]], Compiled]:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        eos = self.vocab.eos_token_ids[0]
        tokens: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.vocab.tokens):
            if b and i not in self.vocab.special_token_ids and i not in self.vocab.eos_token_ids:
                tokens.setdefault(b, []).append(i)
        vocabulary = outlines_core.Vocabulary(eos, tokens)

        def compile_one(schema: dict[str, Any]) -> Compiled:
            regex = build_regex_from_schema(json.dumps(schema), "")  # compact JSON, as the others
            return _OutlinesCompiled(outlines_core.Index(regex, vocabulary), self.vocab_size)

        return compile_one


# -- the engine, timed ---------------------------------------------------------------------------------


class TimedEngine(Engine):
    """kold's engine, with the time of each step's masking kept."""

    mask_times: list[float]

    def _constrain(self, logits: torch.Tensor, rows: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super()._constrain(logits, rows)
        if any(r.matcher is not None for r in rows):
            if out.device.type == "cuda":
                torch.cuda.synchronize()
            self.mask_times.append(time.perf_counter() - t0)
        return out


def decode_rate(
    engine: TimedEngine, prompt: list[int], batch: int, steps: int, constrained: int, compiled: Compiled | None
) -> float:
    """Tokens/s of `batch` rows decoding `steps` tokens each, the first `constrained` of them constrained."""
    params = [
        SamplingParams(max_tokens=steps, temperature=1.0, seed=i, ignore_eos=True,
                       constraint=compiled if i < constrained else None)
        for i in range(batch)
    ]  # fmt: skip
    t0 = time.perf_counter()
    handles = [engine.submit(GenerationRequest(prompt, p)) for p in params]
    results = [h.result_sync() for h in handles]
    seconds = time.perf_counter() - t0
    bad = [r for r in results if r.finish_reason != "length" or r.completion_tokens != steps]
    if bad:
        raise RuntimeError(f"a row did not decode {steps} tokens: {bad[0].finish_reason} {bad[0].error}")
    return batch * steps / seconds


def load_model(size: str, device: str) -> tuple[Any, Any, Any]:
    from safetensors.torch import load_file

    from kold.modelgen import write_random_model
    from kold.runtime.config import ModelConfig
    from kold.runtime.model import build_model
    from kold.runtime.tokenizer import Tokenizer

    path = OUT / f"llama-{size}"
    if not (path / "config.json").is_file():
        write_random_model(path, "llama", size, seed=1)
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard), device=device))
    return build_model(state, config), config, Tokenizer.from_dir(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=("tiny", "small", "1b"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="decode runs per configuration (the best is kept)")
    p.add_argument("--schemas", type=int, default=5, help="20-field schemas compiled per library")
    p.add_argument("--device", default="cpu")
    p.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    args = p.parse_args()

    model, config, tokenizer = load_model(args.size, args.device)
    seq_len = min(config.max_position_embeddings, 64 + args.steps + 8)
    engine = TimedEngine(model, tokenizer, config, max_batch=args.batch, max_seq_len=seq_len, device=args.device)
    engine.mask_times = []
    engine.start()
    prompt = tokenizer.encode(PROMPT)
    vocab = Vocabulary.of(tokenizer, config.vocab_size, engine.eos_token_ids)
    print(f"model {args.size} (vocab {config.vocab_size}, {mask_words(config.vocab_size)} mask words), batch "
          f"{args.batch}, {args.steps} steps, {args.device}, torch threads {torch.get_num_threads()}")  # fmt: skip

    def best(constrained: int, compiled: Compiled | None) -> float:
        return max(decode_rate(engine, prompt, args.batch, args.steps, constrained, compiled) for _ in range(args.runs))

    decode_rate(engine, prompt, args.batch, 2, 0, None)  # warm-up
    free = best(0, None)
    print(f"free decode: {free:.0f} tok/s")
    result: dict[str, Any] = {"size": args.size, "batch": args.batch, "steps": args.steps, "device": args.device,
                              "free_tokens_per_s": free, "libs": {}}  # fmt: skip
    try:
        for name in args.libs.split(","):
            try:
                lib = Library(name, vocab, config.vocab_size)
            except ImportError as exc:
                print(f"{name}: skipped ({exc})")
                result["libs"][name] = {"skipped": str(exc)}
                continue
            compile_s = []
            for i in range(args.schemas):
                t0 = time.perf_counter()
                lib.compile(schema20(f"s{i}"))
                compile_s.append(time.perf_counter() - t0)
            compiled = lib.compile(endless("run"))
            half = best(args.batch // 2, compiled)
            engine.mask_times = []
            full = best(args.batch, compiled)
            mask = statistics.median(engine.mask_times) if engine.mask_times else 0.0
            row = {
                "import_s": lib.import_s,
                "vocab_s": lib.vocab_s,
                "compile_ms": statistics.median(compile_s) * 1000,
                "mask_ms": mask * 1000,
                "half_tokens_per_s": half,
                "constrained_tokens_per_s": full,
                "ratio": full / free,
            }
            result["libs"][name] = row
            print(f"{name:14s} import {row['import_s']:5.2f} s  vocab {row['vocab_s'] * 1000:8.1f} ms  compile(20 fields) {row['compile_ms']:8.2f} ms  "
                  f"mask {row['mask_ms']:7.3f} ms/step  half {half:7.0f} tok/s  all {full:7.0f} tok/s  "
                  f"ratio {row['ratio']:.2f}")  # fmt: skip
    finally:
        engine.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
