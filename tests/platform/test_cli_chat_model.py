"""kold/chat_model.py: `kold invoke` tells a chat model from a base model by its snapshot in the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kold.chat_model import config_has_chat_template, has_chat_template, serving_snapshot
from kold.modelgen import write_random_model
from kold.snapshot import build_snapshot
from kold.snapshot.errors import SnapshotError


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("chat") / "model", "llama", "tiny")


def _variant(chat_model: Path, root: Path, name: str, template: object = None, jinja: str | None = None) -> Path:
    """The chat model with tokenizer_config's chat_template replaced (None: removed), and maybe a .jinja file."""
    out = root / name
    shutil.copytree(chat_model, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (out / "chat_template.jinja").write_text(jinja)
    return out


def test_chat_and_base_models_are_told_apart(chat_model: Path, tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    listed = [{"name": "default", "template": "{{ messages[0]['content'] }}"}]
    cases = {
        "modelgen": (chat_model, True),  # make-tiny writes its family's chat template
        "base": (_variant(chat_model, tmp_path, "base"), False),
        "jinja": (_variant(chat_model, tmp_path, "jinja", jinja="{{ messages[0]['content'] }}"), True),
        "listed": (_variant(chat_model, tmp_path, "listed", template=listed), True),
        "blank": (_variant(chat_model, tmp_path, "blank", template="  "), False),
    }
    for name, (model, expected) in cases.items():
        assert has_chat_template(build_snapshot(model, store).uri) is expected, name


def test_a_snapshot_that_is_not_there_is_an_error_not_a_guess(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError):
        has_chat_template((tmp_path / "store").as_uri() + "/snapshots/" + "0" * 32)


def test_the_serving_revision_names_the_snapshot() -> None:
    doc = {
        "serving": "tiny-00002",
        "revisions": [
            {"id": "tiny-00001", "snapshot_uri": "file:///s/snapshots/a"},
            {"id": "tiny-00002", "snapshot_uri": "file:///s/snapshots/b"},
        ],
    }
    assert serving_snapshot(doc) == "file:///s/snapshots/b"
    assert serving_snapshot({**doc, "serving": None}) is None
    assert serving_snapshot({"serving": "x", "revisions": "garbage"}) is None


def test_tokenizer_configs() -> None:
    assert config_has_chat_template({"chat_template": "{{ x }}"})
    assert not config_has_chat_template({"chat_template": None})
    assert not config_has_chat_template({"chat_template": [{"name": "tool_use"}]})  # no template in it
    assert not config_has_chat_template([])
