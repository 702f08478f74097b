"""The pure parts of the fake API server (tests/knative/apiserver.py): request paths, `Status` errors shaped
as Kubernetes returns them, label and field selectors, merge and JSON patches, the object each kind of write
(create, replace, patch, server-side apply) leaves, and the leaf paths its simplified field ownership is kept
on. No I/O, no locks, no store: each piece is testable alone, and the server only orchestrates them."""

from __future__ import annotations

import copy
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]
Selector = Callable[[Obj], bool]
LeafPath = tuple[str, ...]
Owners = dict[LeafPath, set[str]]  # the field managers that own each leaf
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"
MISSING = object()
SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields")

_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"[-A-Za-z0-9_.]*"
_EXISTS = re.compile(rf"^(?P<neg>!?)\s*(?P<key>{_KEY})$")
_EQUALS = re.compile(rf"^(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_VALUE})$")
_SET = re.compile(rf"^(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")


@dataclass(frozen=True)
class Resource:
    """Where a request points: the parsed URL path."""

    group: str  # "" for the core API
    version: str
    plural: str
    namespace: str | None
    name: str | None = None
    subresource: str | None = None

    @property
    def qualified(self) -> str:
        """`plural.group`, the resource's name in RBAC and in error messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def matches(self, plural: str) -> bool:
        """Whether a test's `plural` (bare or group-qualified, optionally `/status`) names this resource."""
        base, _, sub = plural.partition("/")
        return base in (self.plural, self.qualified) and (not sub or sub == self.subresource)

    def named(self, name: str | None) -> Resource:
        return Resource(self.group, self.version, self.plural, self.namespace, name, self.subresource)


def parse_path(path: str) -> Resource | None:
    """The resource a REST path names, or None for a path that names none."""
    m = _PATH.match(path)
    if m is None:
        return None
    return Resource(m["group"] or "", m["version"] or "v1", m["plural"], m["ns"], m["name"], m["sub"])


def verb_of(method: str, res: Resource, query: dict[str, str]) -> str:
    """The RBAC verb a request is checked as (get/list/watch/create/update/patch/delete)."""
    if method == "GET":
        if query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if res.name else "list"
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    if method not in verbs or (method == "POST") == bool(res.name):
        raise ApiError(
            405, "MethodNotAllowed", f"the server does not allow this method on the requested resource ({method})"
        )
    return verbs[method]


def in_scope(scope: Resource, res: Resource) -> bool:
    """Whether an object at `res` is in a list/watch of `scope` (same resource; same namespace unless all)."""
    return (scope.group, scope.plural) == (res.group, res.plural) and scope.namespace in (None, res.namespace)


def spec_part(obj: Obj) -> Obj:
    """What `metadata.generation` tracks for a custom resource: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def unchanged(old: Obj, new: Obj, status_write: bool) -> bool:
    """Whether a write changes nothing a client controls (then Kubernetes skips it: no new resourceVersion)."""
    if status_write:
        return old.get("status") == new.get("status")

    def client_part(obj: Obj) -> Obj:
        meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in SERVER_FIELDS}
        return {**spec_part(obj), "metadata": meta}

    return client_part(old) == client_part(new)


# -- errors -----------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the server refuses; `status()` is the Kubernetes `Status` body it answers with."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        return status_body(self.code, self.reason, self.message, self.details)


def status_body(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message}
    body["reason"] = reason
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def details(res: Resource) -> Obj:
    """`details` as the API server fills it for a resource: `kind` is the plural, as Kubernetes sends it."""
    named: Obj = {"name": res.name} if res.name else {}
    return {**named, "group": res.group, "kind": res.plural}


def not_found(res: Resource) -> ApiError:
    return ApiError(404, "NotFound", f'{res.qualified} "{res.name}" not found', details(res))


def already_exists(res: Resource) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{res.qualified} "{res.name}" already exists', details(res))


def conflict(res: Resource) -> ApiError:
    message = (
        f'Operation cannot be fulfilled on {res.qualified} "{res.name}": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    return ApiError(409, "Conflict", message, details(res))


def invalid(res: Resource, field_path: str, detail: str) -> ApiError:
    message = f'{res.qualified} "{res.name}" is invalid: {field_path}: {detail}'
    cause = {"reason": "FieldValueInvalid", "message": detail, "field": field_path}
    return ApiError(422, "Invalid", message, {**details(res), "causes": [cause]})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def apply_conflict(res: Resource, owners_by_path: dict[LeafPath, str]) -> ApiError:
    """409 for a non-forced apply that would change fields other managers own (one cause per field)."""
    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f'conflict with "{owner}" using {res.api_version}',
            "field": "." + ".".join(path),
        }
        for path, owner in sorted(owners_by_path.items())
    ]
    if len(causes) == 1:
        text = f"{causes[0]['message']}: {causes[0]['field']}"
    else:  # grouped by manager, as Kubernetes words it
        groups: dict[str, list[str]] = {}
        for cause in causes:
            groups.setdefault(cause["message"].replace("conflict with", "conflicts with", 1), []).append(cause["field"])
        text = "\n".join(f"{head}:\n" + "\n".join(f"- {f}" for f in fields) for head, fields in sorted(groups.items()))
    plural = "s" if len(causes) > 1 else ""
    message = f"Apply failed with {len(causes)} conflict{plural}: {text}"
    return ApiError(409, "Conflict", message, {**details(res), "causes": causes})


# -- selectors --------------------------------------------------------------------------------------------


def _split_terms(text: str) -> list[str]:
    """Split on the commas that separate requirements, not the ones inside `in (a,b)`."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(text[start:i].strip())
            start = i + 1
    terms.append(text[start:].strip())
    return [t for t in terms if t]


def label_selector(text: str) -> Selector:
    """A predicate over an object's labels, for a labelSelector query (400 when it does not parse)."""
    requirements: list[tuple[str, str, frozenset[str]]] = []  # (key, operator, values)
    for term in _split_terms(text):
        if m := _EQUALS.match(term):
            requirements.append((m["key"], "!=" if m["op"] == "!=" else "=", frozenset([m["value"]])))
        elif m := _SET.match(term):
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            requirements.append((m["key"], m["op"], values))
        elif m := _EXISTS.match(term):
            requirements.append((m["key"], "!" if m["neg"] else "exists", frozenset()))
        else:
            raise bad_request(f"unable to parse requirement: {term!r}")

    def holds(labels: dict[str, str], key: str, op: str, values: frozenset[str]) -> bool:
        if op in ("exists", "!"):
            return (key in labels) == (op == "exists")
        inside = key in labels and labels[key] in values
        return inside if op in ("=", "in") else not inside  # "!=" and "notin" also match a missing key

    def match(obj: Obj) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(holds(labels, *req) for req in requirements)

    return match


def field_selector(text: str) -> Selector:
    """A predicate for a fieldSelector: custom resources support only metadata.name and metadata.namespace."""
    checks: list[tuple[str, str, bool]] = []
    for term in _split_terms(text):
        m = re.match(r"^([\w.]+)\s*(==|=|!=)\s*(.*)$", term)
        if m is None:
            raise bad_request(f"invalid selector: {term!r}; can't understand it")
        if m[1] not in ("metadata.name", "metadata.namespace"):
            raise bad_request(f"field label not supported: {m[1]}")
        checks.append((m[1].split(".")[1], m[3], m[2] == "!="))
    return lambda obj: all(((obj.get("metadata") or {}).get(f) == v) != n for f, v, n in checks)


# -- patches ----------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a key; lists are replaced whole). Returns a new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path and not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _add(doc: Any, parts: list[str], value: Any, replace: bool) -> Any:
    if not parts:
        return value
    parent, last = _walk(doc, parts[:-1]), parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if replace:
            parent[index] = value
        elif not 0 <= index <= len(parent):
            raise IndexError(f"index {index} out of range")
        else:
            parent.insert(index, value)
    else:
        if replace and last not in parent:
            raise KeyError(last)
        parent[last] = value
    return doc


def _delete(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise ValueError("cannot remove the whole document")
    parent, last = _walk(doc, parts[:-1]), parts[-1]
    return parent.pop(int(last)) if isinstance(parent, list) else parent.pop(last)


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test). A failing op is a 422, as on Kubernetes."""
    if not isinstance(ops, list):
        raise bad_request("a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        try:
            kind, parts = op["op"], _pointer(op["path"])
            if kind in ("add", "replace"):
                doc = _add(doc, parts, copy.deepcopy(op["value"]), replace=kind == "replace")
            elif kind == "remove":
                _delete(doc, parts)
            elif kind in ("move", "copy"):
                source = _pointer(op["from"])
                value = _delete(doc, source) if kind == "move" else copy.deepcopy(_walk(doc, source))
                doc = _add(doc, parts, value, replace=False)
            elif kind == "test":
                if _walk(doc, parts) != op["value"]:
                    raise ValueError(f"test failed at {op['path']}")
            else:
                raise ValueError(f"unknown op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(
                422, "Invalid", f"the server rejected our request due to an error in our request: {exc}"
            ) from exc
    return doc


# -- writes: the object each kind of write leaves ---------------------------------------------------------


def create_body(res: Resource, body: Obj) -> Obj:
    """The object a create stores: server-set metadata dropped, the name (or generateName) and namespace
    checked, status dropped (the status subresource is on)."""
    new = copy.deepcopy(body)
    meta = new.setdefault("metadata", {})
    for name in SERVER_FIELDS:
        meta.pop(name, None)
    if not meta.get("name"):
        if not meta.get("generateName"):
            raise invalid(res, "metadata.name", "Required value: name or generateName is required")
        meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
    if meta.get("namespace", res.namespace) != res.namespace:
        raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
    if res.namespace:
        meta["namespace"] = res.namespace
    new.pop("status", None)
    return new


def check_name(res: Resource, body: Obj) -> None:
    name = (body.get("metadata") or {}).get("name", res.name)
    if name != res.name:
        raise bad_request(f"the name of the object ({name}) does not match the name on the URL ({res.name})")


def update_body(res: Resource, current: Obj, body: Obj) -> Obj:
    """The object a replace stores: 422 without a resourceVersion, 409 Conflict with a stale one."""
    check_name(res, body)
    rv = (body.get("metadata") or {}).get("resourceVersion")
    if not rv:
        raise invalid(res, "metadata.resourceVersion", "Invalid value: 0x0: must be specified for an update")
    if rv != current["metadata"]["resourceVersion"]:
        raise conflict(res)
    new = copy.deepcopy(body)
    new.setdefault("metadata", {}).update(name=res.name, namespace=res.namespace)
    return new


def patch_body(res: Resource, current: Obj | None, body: Any, ctype: str, field_manager: str | None) -> Obj:
    """The object a merge or JSON patch (or an apply to /status) leaves; 415 for other patch types."""
    if ctype not in (MERGE, JSON_PATCH, APPLY):
        accepted = f"{JSON_PATCH}, {MERGE}, {APPLY}"
        message = f"the body of the request was in an unknown format - accepted media types include: {accepted}"
        raise ApiError(415, "UnsupportedMediaType", message)
    if ctype == APPLY and not field_manager:
        raise bad_request("PATCH /apply requires a fieldManager: fieldManager is required for apply patch")
    if current is None:
        raise not_found(res)
    old = current
    if ctype == APPLY:  # on /status: the applied status laid over the current one
        return overlay(old, {"status": body.get("status") or {}})
    new = merge_patch(old, body) if ctype == MERGE else json_patch(old, body)
    if not isinstance(new, dict):
        raise invalid(res, "", "the patch must leave an object")
    rv = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
    if rv and rv != old["metadata"]["resourceVersion"]:
        raise conflict(res)
    new.setdefault("metadata", {}).update(name=res.name, namespace=res.namespace)
    return new


def apply_body(
    res: Resource, current: Obj | None, owners: Owners, config: Obj, manager: str | None, *, force: bool
) -> tuple[Obj, Owners]:
    """Server-side apply, simplified: a set of managers owns each leaf path (a list is one leaf); changing
    a leaf another manager owns conflicts unless forced; leaves this manager applied before and leaves
    out now are removed when nobody else owns them. Returns the object and its new ownership."""
    if not manager:
        raise bad_request("PATCH /apply requires a fieldManager: fieldManager is required for apply patch")
    check_name(res, config)
    applied = leaves(config)
    if current is None:
        named = overlay({"metadata": {"name": res.name}}, config)
        return create_body(res, named), {p: {manager} for p in applied}
    rv = (config.get("metadata") or {}).get("resourceVersion")
    if rv and rv != current["metadata"]["resourceVersion"]:
        raise conflict(res)  # a resourceVersion in an apply is a precondition, as on Kubernetes
    before = leaves(current)
    owners = {p: set(o) for p, o in owners.items()}
    taken = {
        p: sorted(owners[p] - {manager})[0]
        for p, v in applied.items()
        if before.get(p, MISSING) != v and owners.get(p, set()) - {manager}
    }
    if taken and not force:
        raise apply_conflict(res, taken)
    new = copy.deepcopy(current)
    for path, managers in owners.items():
        if manager in managers and path not in applied:
            managers.discard(manager)
            if not managers:
                remove_path(new, path)
    config = {k: v for k, v in config.items() if k != "status"}
    new = overlay(new, config)
    for path, value in applied.items():
        if before.get(path, MISSING) != value:
            owners[path] = {manager}
        else:
            owners.setdefault(path, set()).add(manager)
    return new, owners


# -- leaf paths (field ownership) -------------------------------------------------------------------------


def leaves(obj: Obj) -> dict[LeafPath, Any]:
    """Every leaf under an object's fields, by path; a list is one leaf. Server-set metadata and status
    are left out: they are nobody's to own."""
    out: dict[LeafPath, Any] = {}

    def walk(value: Any, path: LeafPath) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(sub, (*path, key))
        else:
            out[path] = value

    for key, value in obj.items():
        if key == "metadata":
            meta = {k: v for k, v in (value or {}).items() if k in ("labels", "annotations")}
            if meta:
                walk(meta, ("metadata",))
        elif key not in ("status", "apiVersion", "kind"):
            walk(value, (key,))
    return out


def overlay(base: Obj, config: Obj) -> Obj:
    """`config` laid over `base`: maps merge recursively, anything else is replaced (apply's merge)."""
    result = copy.deepcopy(base)
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = overlay(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def remove_path(obj: Obj, path: LeafPath) -> None:
    """Delete the leaf at `path`, then the maps that removing it left empty."""
    parents: list[tuple[Obj, str]] = []
    node: Any = obj
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return
        parents.append((node, key))
        node = node[key]
    for depth, (parent, key) in enumerate(reversed(parents)):
        if depth > 0 and parent[key] != {}:
            break
        del parent[key]
