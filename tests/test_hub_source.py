"""Hugging Face Hub ids as model sources (snapshot/hub_source.py), through huggingface_hub itself.

No network reaches the Hub from the machines these tests run on, so the library is tested two ways:
- offline (HF_HUB_OFFLINE), against a hub cache the test lays out in the library's real layout:
  `models--owner--name/refs/<branch>` holding a commit, `snapshots/<commit>/<file>` links into `blobs/`;
- online against `FakeHub`, a loopback HTTP server that answers the Hub endpoints a download uses
  (revision info, tree listing, HEAD/GET of `resolve/`, the Hub's X-Error-Code errors), reached by
  `kold snapshot build` in a subprocess through HF_ENDPOINT with HF_TOKEN set.

huggingface_hub reads its environment once, when it is imported, and this process imported it long
before a test runs: the in-process tests set `constants.HF_HUB_OFFLINE`, which is what HF_HUB_OFFLINE=1
sets at import. The CLI tests set the real variables in a fresh process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from huggingface_hub import constants

from kold.modelgen import write_random_model
from kold.snapshot import ModelSourceError, build_snapshot, restore
from kold.snapshot.resolve import resolve_model, spec_kind

REPO = "kold-test/tiny"
CHUNK = 64 << 10
TOKEN = "hf_kold_test_token"
# what a cache filled by a whole-repository download may hold besides the model: none of it is built
EXTRAS = {
    "README.md": b"# tiny\n",
    "notes.json": b'{"not": "a model file"}',
    "pytorch_model.bin": b"pickled weights kold never reads",
    "onnx/model.safetensors": b"not read either",
}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".gguf"))


def etag(path: str, data: bytes) -> str:
    """The Hub's ETag of a file: its sha256 for an LFS file, its git blob id otherwise (the cache's blob name)."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_id(data)


def commit_id(files: Mapping[str, bytes]) -> str:
    listing = "".join(f"{path}\0{etag(path, data)}\n" for path, data in sorted(files.items()))
    return hashlib.sha1(listing.encode()).hexdigest()


def model_files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


def lay_out_cache(cache: Path, repo_id: str, files: Mapping[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
    """One commit of `repo_id` in huggingface_hub's cache layout, as a download leaves it; returns the commit."""
    commit = commit_id(files)
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    for path, data in files.items():
        blob = storage / "blobs" / etag(path, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random tiny models: `main` in several shards with an index, `dev` in one file."""
    root = tmp_path_factory.mktemp("hub-models")
    return {
        "main": write_random_model(root / "main", "llama", "tiny", seed=1, shard_bytes=128 << 10),
        "dev": write_random_model(root / "dev", "qwen2", "tiny", seed=2),
    }


@dataclass(frozen=True)
class Cache:
    root: Path
    commits: dict[str, str]  # branch -> commit


@pytest.fixture
def cache(tmp_path: Path, models: dict[str, Path]) -> Cache:
    """kold-test/tiny at main (sharded, beside files nobody built) and at dev (the other model)."""
    root = tmp_path / "hub-cache"
    main = lay_out_cache(root, REPO, {**model_files(models["main"]), **EXTRAS})
    dev = lay_out_cache(root, REPO, model_files(models["dev"]), refs=("dev",))
    return Cache(root, {"main": main, "dev": dev})


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as this process's huggingface_hub would have read it at import."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def store(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_same_weights(uri: str, model_dir: Path) -> None:
    snap = restore(uri)
    expected = weights(model_dir)
    assert set(snap.tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(snap.tensors[name], tensor), name


# -- offline, in process ---------------------------------------------------------------------------


@pytest.mark.usefixtures("offline")
def test_a_hub_id_builds_its_commit_with_provenance(cache: Cache, models: dict[str, Path], store: str) -> None:
    resolved = resolve_model(REPO, cache_dir=cache.root)
    main = cache.commits["main"]
    assert resolved.kind == "hub"
    assert resolved.model_dir == cache.root / "models--kold-test--tiny" / "snapshots" / main
    assert dict(resolved.provenance) == {
        "source": "hub",
        "hub_repo": REPO,
        "hub_commit": main,
    }
    assert resolved.config == json.loads((models["main"] / "config.json").read_bytes())

    built = build_snapshot(resolved, store, chunk_size=CHUNK)
    assert built.manifest.metadata == {
        "model_type": "llama",
        "architectures": "LlamaForCausalLM",
        **resolved.provenance,
    }
    assert_same_weights(built.uri, models["main"])
    # the model's own files only: not notes.json, the README, the .bin or the nested safetensors the folder holds
    assert {f.name for f in built.manifest.files} == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    # the same tensors and chunks as the directory's own snapshot: only the provenance differs
    direct = build_snapshot(models["main"], store, chunk_size=CHUNK).manifest
    assert (built.manifest.tensors, built.manifest.chunk_checksums) == (direct.tensors, direct.chunk_checksums)
    assert built.manifest.id != direct.id


@pytest.mark.usefixtures("offline")
def test_a_revision_by_branch_by_commit_and_in_the_id(cache: Cache, models: dict[str, Path], store: str) -> None:
    dev = cache.commits["dev"]
    by_branch = resolve_model(REPO, revision="dev", cache_dir=cache.root)
    in_the_id = resolve_model(f"{REPO}@dev", cache_dir=cache.root)
    by_commit = resolve_model(REPO, revision=dev, cache_dir=cache.root)
    # one commit, however it was asked for, is one snapshot
    assert by_branch.provenance == in_the_id.provenance == by_commit.provenance
    assert by_commit.provenance["hub_commit"] == dev
    branch_built = build_snapshot(by_branch, store, chunk_size=CHUNK)
    assert branch_built.manifest.id == build_snapshot(by_commit, store, chunk_size=CHUNK).manifest.id
    assert_same_weights(branch_built.uri, models["dev"])
    main = resolve_model(REPO, revision=cache.commits["main"], cache_dir=cache.root)
    assert main.provenance["hub_commit"] == cache.commits["main"]
    with pytest.raises(ModelSourceError, match=r"two revisions given \(dev in the id, main as an option\)"):
        resolve_model(f"{REPO}@dev", revision="main", cache_dir=cache.root)
    assert resolve_model(f"{REPO}@dev", revision="dev", cache_dir=cache.root).provenance["hub_commit"] == dev


def test_spec_kind_takes_a_revision_in_the_id() -> None:
    assert spec_kind(f"{REPO}@main") == spec_kind(f"{REPO}@refs/pr/3") == spec_kind(REPO) == "hub"
    with pytest.raises(ModelSourceError, match=r"not a directory, a \.gguf file or a Hugging Face Hub id"):
        spec_kind(f"{REPO}@")


@pytest.mark.usefixtures("offline")
def test_what_the_cache_does_not_hold_is_one_clear_line(cache: Cache) -> None:
    with pytest.raises(ModelSourceError) as missing:
        resolve_model("kold-test/nothing", cache_dir=cache.root)
    assert str(missing.value) == (
        f"kold-test/nothing: revision 'main' is not in the Hugging Face cache {cache.root} and HF_HUB_OFFLINE is "
        "set: pre-download it with `hf download kold-test/nothing --revision main` where the Hub is reachable, or "
        "point HF_HUB_CACHE at a cache that holds it (no local directory kold-test/nothing either)"
    )
    other_branch = (
        r"kold-test/tiny: revision 'v2' is not in the Hugging Face cache .* \(cached revisions: dev, main\) and "
        r"HF_HUB_OFFLINE is set: pre-download it with `hf download kold-test/tiny --revision v2`"
    )
    with pytest.raises(ModelSourceError, match=other_branch):
        resolve_model(REPO, revision="v2", cache_dir=cache.root)
    with pytest.raises(ModelSourceError, match=r"revision '0{40}' is not in the Hugging Face cache"):
        resolve_model(REPO, revision="0" * 40, cache_dir=cache.root)


@pytest.mark.usefixtures("offline")
def test_pickled_weights_only_are_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    small = {k: v for k, v in model_files(models["dev"]).items() if not k.endswith(".safetensors")}
    lay_out_cache(tmp_path, "kold-test/pickled", {**small, "pytorch_model.bin": b"\x80\x02pickle"})
    pickled = (
        r"kold-test/pickled@main \(commit [0-9a-f]{12}\): the cached snapshot has only pytorch_model\.bin and no "
        r"safetensors weights: kold reads safetensors only"
    )
    with pytest.raises(ModelSourceError, match=pickled):
        resolve_model("kold-test/pickled", cache_dir=tmp_path)
    lay_out_cache(tmp_path, "kold-test/gguf", {"tiny.Q8_0.gguf": b"GGUF", "README.md": b"x"})
    gguf = re.escape(
        "has GGUF files (tiny.Q8_0.gguf) and no safetensors: download one (`hf download kold-test/gguf "
        "tiny.Q8_0.gguf`) and pass the .gguf file instead"
    )
    with pytest.raises(ModelSourceError, match=gguf):
        resolve_model("kold-test/gguf", cache_dir=tmp_path)
    lay_out_cache(tmp_path, "kold-test/config-only", {"config.json": b"{}"})
    partial = (
        r"kold-test/config-only@main \(commit [0-9a-f]{12}\): no safetensors weights in the cached snapshot and "
        r"HF_HUB_OFFLINE is set: pre-download them with `hf download kold-test/config-only --revision main`"
    )
    with pytest.raises(ModelSourceError, match=partial):
        resolve_model("kold-test/config-only", cache_dir=tmp_path)


@pytest.mark.usefixtures("offline")
def test_a_cache_missing_a_shard_of_the_index_is_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    files = model_files(models["main"])
    shards = sorted(set(json.loads(files["model.safetensors.index.json"])["weight_map"].values()))
    assert len(shards) > 1
    lay_out_cache(tmp_path, REPO, {k: v for k, v in files.items() if k != shards[-1]})
    incomplete = (
        rf"kold-test/tiny@main \(commit [0-9a-f]{{12}}\): the cached snapshot lacks {re.escape(shards[-1])}: "
        r"pre-download it with `hf download kold-test/tiny --revision main`"
    )
    with pytest.raises(ModelSourceError, match=incomplete):
        resolve_model(REPO, cache_dir=tmp_path)


@pytest.mark.usefixtures("offline")
def test_a_dtype_does_not_apply(cache: Cache) -> None:
    with pytest.raises(ModelSourceError, match="a dtype applies to GGUF files only"):
        resolve_model(REPO, cache_dir=cache.root, dtype="float16")


# -- the Hub over HTTP: a fake one on loopback ----------------------------------------------------


@dataclass
class FakeRepo:
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files
    gated: bool = False

    def push(self, files: Mapping[str, bytes], branch: str = "main") -> str:
        commit = commit_id(files)
        self.commits[commit] = dict(files)
        self.refs[branch] = commit
        return commit


class FakeHub(ThreadingHTTPServer):
    """The Hub's download endpoints, as huggingface_hub calls them: `GET /api/models/{repo}/revision/{rev}`,
    `GET /api/models/{repo}/tree/{commit}`, `HEAD|GET /{repo}/resolve/{commit}/{path}`; errors as the Hub
    sends them (401 RepoNotFound for an unknown or unauthorized repository, 401 GatedRepo, 404
    RevisionNotFound). It logs every request with its Authorization header."""

    daemon_threads = True

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def downloaded(self, repo_id: str) -> set[str]:
        prefix = f"/{repo_id}/resolve/"
        return {
            unquote(p[len(prefix) :]).split("/", 1)[1] for m, p, _ in self.log if m == "GET" and p.startswith(prefix)
        }


_API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/?]+)")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = urlsplit(self.path).path
        auth = self.headers.get("Authorization")
        self.server.log.append((self.command, path, auth))
        match = _API.fullmatch(path) or _RESOLVE.fullmatch(path)
        repo = self.server.repos.get(match["repo"]) if match else None
        if match is None or repo is None:
            return self._error(401, "RepoNotFound")
        if repo.gated and auth != f"Bearer {self.server.token}":
            return self._error(401, "GatedRepo")
        rev = unquote(match["rev"])
        commit = rev if rev in repo.commits else repo.refs.get(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound")
        files = repo.commits[commit]
        headers = {"X-Repo-Commit": commit}
        if "path" not in match.groupdict():
            if match["kind"] == "revision":
                info = {"id": match["repo"], "sha": commit, "siblings": [{"rfilename": p} for p in files]}
                return self._send(json.dumps(info).encode(), headers, body)
            tree = [_tree_entry(p, data) for p, data in sorted(files.items())]
            return self._send(json.dumps(tree).encode(), headers, body)
        name = unquote(match["path"])
        if name not in files:
            return self._error(404, "EntryNotFound", headers)
        self._send(files[name], {**headers, "ETag": f'"{etag(name, files[name])}"'}, body)

    def _send(self, data: bytes, headers: Mapping[str, str], body: bool, status: int = 200) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, headers: Mapping[str, str] | None = None) -> None:
        self._send(
            json.dumps({"error": code}).encode(),
            {**(headers or {}), "X-Error-Code": code},
            self.command == "GET",
            status,
        )


def _tree_entry(path: str, data: bytes) -> dict[str, object]:
    entry: dict[str, object] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
    if is_lfs(path):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


@pytest.fixture
def hub(models: dict[str, Path]) -> Iterator[FakeHub]:
    server = FakeHub(TOKEN)
    tiny = server.repos[REPO] = FakeRepo()
    tiny.push({**model_files(models["main"]), **EXTRAS})
    tiny.push(model_files(models["dev"]), branch="dev")
    small = {k: v for k, v in model_files(models["dev"]).items() if not k.endswith(".safetensors")}
    server.repos["kold-test/pickled"] = FakeRepo()
    server.repos["kold-test/pickled"].push({**small, "pytorch_model.bin": b"\x80\x02pickle"})
    server.repos["kold-test/gguf"] = FakeRepo()
    server.repos["kold-test/gguf"].push({"tiny.Q4_0.gguf": b"GGUF", "README.md": b"# tiny"})
    gated = server.repos["kold-test/gated"] = FakeRepo(gated=True)
    gated.push(model_files(models["dev"]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# -- the CLI, in a fresh process with the real environment variables ------------------------------


def kold(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"KOLD_HOME": str(home), "PATH": "/usr/bin:/bin", "HF_HOME": str(home / "hf"), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kold", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**base, **env},
        check=False,
    )


def inspect_json(uri: str, home: Path) -> dict[str, object]:
    done = kold("snapshot", "inspect", uri, "-o", "json", home=home)
    assert done.returncode == 0, done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def test_kold_snapshot_build_offline_from_the_cache(cache: Cache, store: str, tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache.root)}
    built = kold("snapshot", "build", f"{REPO}@dev", "--to", store, home=tmp_path / "home", **env)
    assert built.returncode == 0, built.stderr
    meta = inspect_json(built.stdout.strip(), tmp_path / "home")["metadata"]
    assert meta == {
        "model_type": "qwen2",
        "architectures": "Qwen2ForCausalLM",
        "source": "hub",
        "hub_repo": REPO,
        "hub_commit": cache.commits["dev"],
    }
    missing = kold("snapshot", "build", "kold-test/nothing", "--to", store, home=tmp_path / "home", **env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "kold-test/nothing: revision 'main' is not in the Hugging Face cache" in missing.stderr
    assert (
        "HF_HUB_OFFLINE is set: pre-download it with `hf download kold-test/nothing --revision main`" in missing.stderr
    )


def test_kold_snapshot_build_downloads_through_hf_endpoint(
    hub: FakeHub, models: dict[str, Path], store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_ENDPOINT is where the download goes, HF_TOKEN is sent, HF_HUB_CACHE is where it lands: only the
    safetensors the index names and the small files are fetched, and the commit is pinned."""
    home, hf_cache = tmp_path / "home", tmp_path / "hf-cache"
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_CACHE": str(hf_cache)}
    built = kold("snapshot", "build", REPO, "--to", store, "--revision", "main", home=home, **env)
    assert built.returncode == 0, built.stderr
    commit = hub.repos[REPO].refs["main"]
    meta = inspect_json(built.stdout.strip(), home)["metadata"]
    assert isinstance(meta, dict) and meta["hub_commit"] == commit and "hub_revision" not in meta
    assert_same_weights(built.stdout.strip(), models["main"])
    assert hub.downloaded(REPO) == {p.name for p in models["main"].iterdir()}  # no .bin, README, notes or onnx/
    # every call about the repository carries the token (huggingface_hub 2.x also fetches a registry of its own)
    about_repo = [(path, auth) for _, path, auth in hub.log if REPO in path]
    assert about_repo and {auth for _, auth in about_repo} == {f"Bearer {TOKEN}"}, hub.log
    assert (hf_cache / "models--kold-test--tiny" / "refs" / "main").read_text() == commit

    # the download is in HF_HUB_CACHE now: the same build offline finds it and gives the same snapshot
    again = kold("snapshot", "build", REPO, "--to", store, home=home, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache))
    assert again.returncode == 0 and again.stdout == built.stdout, again.stderr

    # a download cut short (a shard missing) is not built from what is there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot_dir = hf_cache / "models--kold-test--tiny" / "snapshots" / commit
    shard = sorted(snapshot_dir.glob("*.safetensors"))[-1]
    shard.unlink()
    # huggingface_hub 2.x finds it missing from the tree listing it cached with the download; with 1.x kold's own check does
    partial = rf"revision 'main' is only partly in the Hugging Face cache|the cached snapshot lacks {shard.name}"
    with pytest.raises(ModelSourceError, match=partial):
        resolve_model(REPO, cache_dir=hf_cache)


@pytest.mark.parametrize(
    ("spec", "with_token", "message"),
    [
        (
            "kold-test/absent",
            True,
            "kold-test/absent: no such model repository on the Hub, or a private one: check the id (owner/name); "
            "for a private repository set HF_TOKEN",
        ),
        (
            "kold-test/gated",
            False,
            "kold-test/gated: a gated repository: accept its conditions on its Hub page, then set HF_TOKEN to a "
            "token of that account",
        ),
        (
            "kold-test/tiny@v9",
            True,
            "kold-test/tiny: no revision 'v9' in the repository: name one of its branches, tags or commits",
        ),
        (
            "kold-test/pickled",
            True,
            "the repository has only pytorch_model.bin and no safetensors weights: kold reads safetensors only, "
            "never pickled or other weight formats",
        ),
        (
            "kold-test/gguf",
            True,
            "the repository has GGUF files (tiny.Q4_0.gguf) and no safetensors: download one "
            "(`hf download kold-test/gguf tiny.Q4_0.gguf`) and pass the .gguf file instead",
        ),
    ],
)
def test_hub_errors_are_one_line(hub: FakeHub, spec: str, with_token: bool, message: str, tmp_path: Path) -> None:
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        **({"HF_TOKEN": TOKEN} if with_token else {}),
    }
    failed = kold("snapshot", "build", spec, "--to", (tmp_path / "store").as_uri(), home=tmp_path / "home", **env)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    lines = [line for line in failed.stderr.splitlines() if message in line]
    assert len(lines) == 1 and lines[0].startswith(f"kold: error: {spec.split('@', maxsplit=1)[0]}"), failed.stderr
    assert "No files matched" not in failed.stderr  # huggingface_hub's warning: kold's line says it better


def test_the_gated_repository_with_its_token(hub: FakeHub, models: dict[str, Path], tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    built = kold("snapshot", "build", "kold-test/gated", "--to", (tmp_path / "s").as_uri(), home=tmp_path / "h", **env)
    assert built.returncode == 0, built.stderr
    assert_same_weights(built.stdout.strip(), models["dev"])
