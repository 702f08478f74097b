"""A Hugging Face Hub id as a model directory: the repository's safetensors weights and small files at
one commit, downloaded into (or found in) `huggingface_hub`'s own cache.

`fetch_hub_model(repo_id, revision=...)` downloads in two steps with `snapshot_download`: first the
small files (config, generation config, tokenizer, chat template, the safetensors index), then the
weights at the commit the first step resolved, so both come from one commit even if the branch moves
meanwhile. Only the shards the index names are fetched (repositories such as Mistral's also hold a
`consolidated.safetensors` of the same weights); without an index, every top-level `*.safetensors`.
Nothing in a subfolder, and never pickled or other weight formats (`.bin`, `.pt`, `.gguf`, ...): a
repository with only those is a `ModelSourceError` that says kold reads safetensors only.

The library reads its own settings from the environment, as it does for every other tool that uses
it: `HF_TOKEN` (or a `hf auth login`), `HF_ENDPOINT` (a mirror), `HF_HUB_CACHE`/`HF_HOME` and
`HF_HUB_OFFLINE` (only the cache is looked at). kold passes none of them, so a user's Hugging Face
setup works unchanged. Its progress bars are its own (tqdm on stderr; `HF_HUB_DISABLE_PROGRESS_BARS=1`
hides them).

What is built is exactly those files, whatever else the cache's folder holds (another tool may have
downloaded the whole repository into it): the same commit gives the same snapshot. The provenance
recorded in the manifest is the repository and the commit the revision resolved to, not the revision
asked for: one commit asked for as `main` or as its sha is one snapshot.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from kold.snapshot.errors import ModelSourceError
from kold.snapshot.sources import ModelSource, from_model_dir

DEFAULT_REVISION = "main"  # what the Hub and huggingface_hub default to
# what a model needs besides its weights: config, generation config, tokenizer, chat template
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
INDEX = "model.safetensors.index.json"
WEIGHTS = "*.safetensors"
NESTED = "*/*"  # fnmatch's * crosses "/": this ignores every file in a subfolder
# weight formats kold never reads, named when a repository has no safetensors
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".onnx", ".msgpack", ".h5", ".ot")
_COMMIT_LENGTH = 40  # a full git commit hash, the name of a snapshot folder in the cache


@dataclass(frozen=True)
class HubModel:
    """One commit of a Hub repository, its files in the cache (`path` is `snapshots/<commit>`)."""

    repo_id: str
    revision: str  # as asked: a branch, tag or commit
    commit: str  # what it resolved to
    path: Path

    @property
    def provenance(self) -> dict[str, str]:
        """The commit, not the revision asked for: the same commit built as `main` and as its sha is the
        same snapshot (one id, uploaded once)."""
        return {"source": "hub", "hub_repo": self.repo_id, "hub_commit": self.commit}

    def source(self) -> ModelSource:
        """The weights and the small files of `SMALL_FILES`, nothing else the folder holds."""
        source = from_model_dir(self.path)
        carried = {name: data for name, data in source.files.items() if _small_file(name)}
        return replace(source, files=carried, description=f"{self.repo_id}@{self.commit}")


def fetch_hub_model(repo_id: str, *, revision: str | None = None, cache_dir: Path | None = None) -> HubModel:
    """Download (or find in the cache) `repo_id` at `revision` (default: main); see the module docstring.
    `cache_dir` replaces huggingface_hub's cache (HF_HUB_CACHE). Every failure is a one-line
    `ModelSourceError` that names the repository and what to do."""
    from huggingface_hub import snapshot_download

    revision = revision or DEFAULT_REVISION
    with _hub_errors(repo_id, revision, cache_dir), _no_match_unsaid():
        small = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[*SMALL_FILES, INDEX],
            ignore_patterns=NESTED,
        )
        path = Path(small)
        commit = path.name
        if len(commit) != _COMMIT_LENGTH or path.parent.name != "snapshots":
            raise ModelSourceError(f"{repo_id}: huggingface_hub returned {path}, not a snapshots/<commit> folder")
        shards = _indexed_shards(repo_id, path)
        snapshot_download(
            repo_id,
            revision=commit,
            cache_dir=cache_dir,
            allow_patterns=shards or WEIGHTS,
            ignore_patterns=NESTED,
        )
    model = HubModel(repo_id, revision, commit, path)
    _check_weights(model, shards)
    return model


@contextmanager
def _no_match_unsaid() -> Iterator[None]:
    """Drops huggingface_hub's "No files matched" warning while kold downloads: a repository without
    these files (a GGUF-only one, say) gets kold's own error, which says what to do instead."""
    logger = logging.getLogger("huggingface_hub._snapshot_download")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No files matched")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _small_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SMALL_FILES)


def _indexed_shards(repo_id: str, path: Path) -> list[str]:
    """The shard names `model.safetensors.index.json` maps to ([] without an index)."""
    index = path / INDEX
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        names = sorted({str(name) for name in weight_map.values()})
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ModelSourceError(f"{repo_id}: {INDEX} is not a valid safetensors index ({exc})") from None
    bad = [name for name in names if "/" in name or "\\" in name or not name.endswith(".safetensors")]
    if bad or not names:
        raise ModelSourceError(f"{repo_id}: {INDEX} names no plain safetensors shards ({', '.join(bad) or 'none'})")
    return names


def _check_weights(model: HubModel, shards: list[str]) -> None:
    """What offline mode or a repository without safetensors leaves missing, said before building."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    where = f"{model.repo_id}@{model.revision} (commit {model.commit[:12]})"
    download = f"`hf download {model.repo_id} --revision {model.revision}`"
    missing = [name for name in shards if not (model.path / name).is_file()]
    if missing:  # a download completes every file it was asked for: only a partial cache lacks shards
        raise ModelSourceError(
            f"{where}: the cached snapshot lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
            f"pre-download it with {download} where the Hub is reachable"
        )
    if shards or any(model.path.glob(WEIGHTS)):
        return
    listed = None if offline else _repo_files(model.repo_id, model.commit)
    names = listed if listed is not None else _folder_files(model.path)
    other = [name for name in names if name.lower().endswith(OTHER_WEIGHTS)]
    holder = "the repository" if listed is not None else "the cached snapshot"
    ggufs = [name for name in other if name.lower().endswith(".gguf")]
    if ggufs:
        raise ModelSourceError(
            f"{where}: {holder} has GGUF files ({_some(ggufs)}) and no safetensors: download one "
            f"(`hf download {model.repo_id} {ggufs[0]}`) and pass the .gguf file instead"
        )
    if other:
        raise ModelSourceError(
            f"{where}: {holder} has only {_some(other)} and no safetensors weights: kold reads safetensors only, "
            "never pickled or other weight formats; use a repository or revision that has *.safetensors"
        )
    if listed is None:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not list the repository"
        raise ModelSourceError(
            f"{where}: no safetensors weights in the cached snapshot and {why}: pre-download them with {download}"
        )
    raise ModelSourceError(f"{where}: the repository has no safetensors weights")


def _folder_files(path: Path) -> list[str]:
    """The files of a snapshot folder (none when nothing was downloaded into it: it is made per file)."""
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def _repo_files(repo_id: str, commit: str) -> list[str] | None:
    """The repository's files at `commit` as the Hub lists them (None when it cannot be asked)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().list_repo_files(repo_id, revision=commit)
    except _download_errors():
        return None


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@contextmanager
def _hub_errors(repo_id: str, revision: str, cache_dir: Path | None) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line `ModelSourceError`s naming the repository and the fix."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise ModelSourceError(
            f"{repo_id}: a gated repository: accept its conditions on its Hub page, then set HF_TOKEN to a token "
            "of that account"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelSourceError(
            f"{repo_id}: no such model repository on the Hub, or a private one: check the id (owner/name); "
            "for a private repository set HF_TOKEN"
        ) from None
    except errors.RevisionNotFoundError:
        raise ModelSourceError(
            f"{repo_id}: no revision {revision!r} in the repository: name one of its branches, tags or commits"
        ) from None
    except errors.LocalEntryNotFoundError:  # offline or unreachable, and not (fully) in the cache
        raise _not_cached(repo_id, revision, cache_dir) from None
    except errors.HFValidationError as exc:
        raise ModelSourceError(f"{repo_id}: not a valid Hub id or revision ({_first_line(exc)})") from None
    except errors.HfHubHTTPError as exc:
        raise ModelSourceError(f"{repo_id}: the Hub refused the download ({_first_line(exc)})") from None
    except _download_errors() as exc:
        raise ModelSourceError(f"{repo_id}: download failed ({type(exc).__name__}: {_first_line(exc)})") from None


def _not_cached(repo_id: str, revision: str, cache_dir: Path | None) -> ModelSourceError:
    from huggingface_hub import constants

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    refs = storage / "refs"
    cached = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    ref = refs / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    partly = (storage / "snapshots" / commit).is_dir()  # a download cut short, or files deleted since
    state = "is only partly" if partly else "is not"
    note = f" (cached revisions: {', '.join(cached)})" if cached and not partly else ""
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached (network, HF_ENDPOINT)"
    return ModelSourceError(
        f"{repo_id}: revision {revision!r} {state} in the Hugging Face cache {cache}{note} and {why}: pre-download it "
        f"with `hf download {repo_id} --revision {revision}` where the Hub is reachable, or point HF_HUB_CACHE at "
        "a cache that holds it"
    )


def _download_errors() -> tuple[type[Exception], ...]:
    """What a download can raise besides huggingface_hub's named errors: OSError (the network, the cache's disk;
    the library's HTTP errors are OSErrors too) and its HTTP client's own errors: httpx2 (2.x) or httpx (1.x)."""
    found: list[type[Exception]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
