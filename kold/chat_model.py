"""Whether a deployed model is a chat model, so that `kold invoke` can pick chat or completion for it.

A chat model is one whose tokenizer ships a chat template: `chat_template.jinja`, or `chat_template`
in `tokenizer_config.json` (the rule `kold.runtime.tokenizer` applies when it loads the model). A
base model has none, and a chat request to it would be rendered through a generic ChatML template
the model never saw, so `kold invoke` sends it a completion instead.

The answer comes from the function's snapshot in the store, which `kold deploy` wrote and the CLI
can read: the manifest lists the model files, and only the small `tokenizer_config.json` is
fetched when needed. The gateway and the runtime need to know nothing about it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kold.snapshot.store import S3Options


def serving_snapshot(function_doc: dict[str, Any]) -> str | None:
    """The snapshot URI of the revision that serves, from `GET /admin/functions/NAME`."""
    serving = function_doc.get("serving")
    revisions = function_doc.get("revisions")
    for rev in revisions if isinstance(revisions, list) else []:
        if isinstance(rev, dict) and serving is not None and rev.get("id") == serving:
            uri = rev.get("snapshot_uri")
            return uri if isinstance(uri, str) and uri else None
    return None


def has_chat_template(snapshot_uri: str, s3: S3Options | None = None) -> bool:
    """Whether the model in the snapshot has a chat template. Raises SnapshotError if the store cannot tell."""
    from kold.snapshot.restorer import read_manifest
    from kold.snapshot.store import file_key, open_store, parse_snapshot_uri

    ref = parse_snapshot_uri(snapshot_uri)
    store = open_store(ref.store_uri, s3)
    names = {f.name for f in read_manifest(store, ref).files}
    if "chat_template.jinja" in names:
        return True
    if "tokenizer_config.json" not in names:
        return False
    config = json.loads(store.get_bytes(file_key(ref.snapshot_id, "tokenizer_config.json")))
    return config_has_chat_template(config)


def config_has_chat_template(config: Any) -> bool:
    """`chat_template` in a tokenizer_config.json: a template string, or a list of named ones."""
    if not isinstance(config, dict):
        return False
    value = config.get("chat_template")
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list):
        return any(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value)
    return False
