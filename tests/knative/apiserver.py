"""A Kubernetes-API-shaped HTTP server on loopback, for kold's Knative tests.

kold talks to a cluster only through the official `kubernetes` client. Running that client against a real
HTTP server that speaks the same REST dialect (paths, verbs, content types, `Status` errors, chunked
watches) tests the real code path end to end with no monkeypatching, and lets a test inject what a cluster
does to a client: RBAC denials, write conflicts, expired watches.

What it serves, for any resource (`/apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}[/status]]`,
`/api/v1/...` likewise; cluster-wide list/watch at `/apis/{group}/{version}/{plural}`):
- create (409 AlreadyExists), get, list (labelSelector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
  `k notin (a,b)`; fieldSelector: `metadata.name`, `metadata.namespace`), replace (422 without a
  resourceVersion, 409 Conflict on a stale one), patch (merge, json, server-side apply in JSON or YAML
  with `fieldManager` required and a per-leaf field ownership model; strategic merge -> 415 as for custom
  resources; an apply that creates answers 201, which the official CustomObjectsApi returns as None, as
  against a real cluster), delete (a `Status` Success for custom resources, the object for core ones), watch (newline-delimited events in a
  chunked response from a resourceVersion; a too-old one -> an ERROR event with a 410 `Status`).
- metadata the server owns: uid, resourceVersion (one global counter, a string), generation (bumped only
  when something outside metadata and status changes), creationTimestamp. Writes to the main resource
  never change status; writes to `/status` change only status.
- a bearer token from `kubeconfig()`; anything else is 401.

Python-side API for tests (all thread-safe; `plural` is `services` or `services.serving.knative.dev`):
`url`, `token`, `kubeconfig(path, namespace, context)`, `requests` / `calls(...)` / `clear_requests()`,
`objects(plural, namespace)`, `get_object(plural, namespace, name)`, `put_object(obj, plural)`,
`delete_object(plural, namespace, name)`, `set_status(plural, namespace, name, status)` (merge-patches
status; the write a controller makes), `deny(verb, plural)` / `allow(verb, plural)`, `on_write(plural, hook)`,
`compact()` (forget watch history: older resourceVersions become 410), `hook_errors`, `start()`/`stop()`.

Hooks stand in for controllers: they run after every committed write a client makes (HTTP, `put_object`,
`delete_object`; not `set_status`, which is the controllers' own write) in the writer's thread, outside the
store lock and before the HTTP response is sent, so a test sees their effects as soon as its call returns.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from .apimachinery import (
    APPLY,
    JSON_PATCH,
    MERGE,
    MISSING,
    ApiError,
    Obj,
    Owners,
    Resource,
    Selector,
    already_exists,
    apply_body,
    bad_request,
    create_body,
    details,
    field_selector,
    in_scope,
    label_selector,
    leaves,
    merge_patch,
    not_found,
    parse_path,
    patch_body,
    spec_part,
    status_body,
    unchanged,
    update_body,
    verb_of,
)

__all__ = ["APPLY", "JSON_PATCH", "MERGE", "ApiError", "FakeApiServer", "RecordedRequest", "Resource", "WriteEvent"]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it, for tests that assert what a client sent."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any  # parsed JSON or YAML; the raw text when it did not parse; None when empty
    resource: Resource | None


@dataclass(frozen=True)
class WriteEvent:
    """What an `on_write` hook is told: a committed write (type ADDED, MODIFIED or DELETED)."""

    type: str
    resource: Resource
    object: Obj
    old: Obj | None


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    resource: Resource  # group/plural/namespace/name of the object
    object: Obj


@dataclass
class _Stored:
    resource: Resource
    object: Obj
    owners: Owners = field(default_factory=dict)


Hook = Callable[[WriteEvent], None]
_Key = tuple[str, str, str, str]  # group, plural, namespace, name


def _key(res: Resource) -> _Key:
    return (res.group, res.plural, res.namespace or "", res.name or "")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeApiServer:
    """The server and its store. Use as a context manager or call `start()` / `stop()`."""

    def __init__(self, *, history_limit: int = 10_000, user: str = "system:serviceaccount:kold-test:kold") -> None:
        self.token = secrets.token_hex(16)
        self.user = user  # the name 403 messages give, as RBAC's do
        self.history_limit = history_limit
        self.hook_errors: list[BaseException] = []  # a hook that raised: the fixture fails the test on it
        self._cond = threading.Condition(threading.RLock())
        self._store: dict[_Key, _Stored] = {}
        self._history: list[_Event] = []
        self._compacted = 0  # events with rv <= this are gone from the history
        self._rv = 0
        self._denied: set[tuple[str, str]] = set()
        self._kinds: dict[tuple[str, str], str] = {}  # (group, plural) -> kind, for an empty list's kind
        self._hooks: list[tuple[str, Hook]] = []
        self._requests: list[RecordedRequest] = []
        self._stopped = False
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._http = _HTTPServer(("127.0.0.1", 0), _Handler, self)
        self._serve_thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeApiServer:
        self._serve_thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-apiserver", daemon=True
        )
        self._serve_thread.start()
        return self

    def stop(self, join_s: float = 5.0) -> None:
        """End every watch, close every connection and join every thread (bounded: raises if one is stuck)."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
        if self._serve_thread is not None:
            self._http.shutdown()
            self._serve_thread.join(join_s)
        with self._cond:
            conns, threads = list(self._connections), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):  # the client already closed it
                conn.shutdown(socket.SHUT_RDWR)
        self._http.server_close()
        deadline = time.monotonic() + join_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            raise RuntimeError(f"fake API server threads still running after {join_s}s: {stuck}")

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: Path, namespace: str = "kold-test", context: str = "fake") -> Path:
        """Write a kubeconfig whose context `context` points at this server with its token (into `path`, or
        `path`/kubeconfig when `path` is a directory); returns the file's path."""
        if path.is_dir():
            path = path / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake-cluster", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {"token": self.token}}],
            "contexts": [
                {"name": context, "context": {"cluster": "fake-cluster", "user": "fake-user", "namespace": namespace}}
            ],
            "current-context": context,
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # -- test controls ----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._requests)

    def calls(self, method: str, plural: str, name: str | None = None) -> list[RecordedRequest]:
        """The recorded requests with this method on this resource (and object name, when given)."""
        return [
            r
            for r in self.requests
            if r.method == method
            and r.resource is not None
            and r.resource.matches(plural)
            and (name is None or r.resource.name == name)
        ]

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    def deny(self, verb: str, plural: str) -> None:
        """Answer `verb` (get/list/watch/create/update/patch/delete, or `*`) on `plural` with 403 Forbidden."""
        with self._cond:
            self._denied.add((verb, plural))

    def allow(self, verb: str, plural: str) -> None:
        with self._cond:
            self._denied.discard((verb, plural))

    def on_write(self, plural: str, hook: Hook) -> None:
        with self._cond:
            self._hooks.append((plural, hook))

    def compact(self) -> None:
        """Forget the watch history, as etcd compaction does: a watch from an older version gets 410."""
        with self._cond:
            self._history.clear()
            self._compacted = self._rv

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    def objects(self, plural: str, namespace: str | None = None) -> list[Obj]:
        with self._cond:
            return [
                copy.deepcopy(s.object)
                for s in self._store.values()
                if s.resource.matches(plural) and namespace in (None, s.resource.namespace)
            ]

    def get_object(self, plural: str, namespace: str, name: str) -> Obj | None:
        with self._cond:
            stored = self._find(plural, namespace, name)
            return copy.deepcopy(stored.object) if stored else None

    def put_object(self, obj: Obj, plural: str | None = None) -> Obj:
        """Create or overwrite `obj` as a client would (server metadata kept/assigned, events, hooks).
        `plural` defaults to the lowercased kind + "s" (Service -> services)."""
        group, _, version = obj["apiVersion"].rpartition("/")
        meta = obj["metadata"]
        res = Resource(group, version, plural or obj["kind"].lower() + "s", meta.get("namespace"), meta["name"])
        with self._cond:
            old = self._store.get(_key(res))
            new = copy.deepcopy(obj)
            if old is not None and "status" in old.object:
                new.setdefault("status", old.object["status"])
            event = self._commit(res, old.object if old else None, new, manager="put_object", keep_status=False)
        self._notify(event, old.object if old else None)
        return copy.deepcopy(event.object)

    def delete_object(self, plural: str, namespace: str, name: str) -> bool:
        with self._cond:
            stored = self._find(plural, namespace, name)
            if stored is None:
                return False
            event = self._remove(stored)
        self._notify(event, stored.object)
        return True

    def set_status(self, plural: str, namespace: str, name: str, status: Obj) -> Obj:
        """Merge-patch an object's status (None deletes a key), bump its resourceVersion, emit MODIFIED."""
        with self._cond:
            stored = self._find(plural, namespace, name)
            if stored is None:
                raise KeyError(f"{plural} {namespace}/{name} not found")
            new = copy.deepcopy(stored.object)
            new["status"] = merge_patch(new.get("status") or {}, status)
            event = self._commit(stored.resource, stored.object, new, manager=None, keep_status=False)
            return copy.deepcopy(event.object)

    def _find(self, plural: str, namespace: str, name: str) -> _Stored | None:
        found = [
            s
            for s in self._store.values()
            if s.resource.matches(plural) and s.resource.namespace == namespace and s.resource.name == name
        ]
        if len(found) > 1:
            raise ValueError(f"{plural!r} is ambiguous: qualify it with its group")
        return found[0] if found else None

    # -- the store --------------------------------------------------------------------------------------

    def _commit(
        self,
        res: Resource,
        old: Obj | None,
        new: Obj,
        *,
        manager: str | None,
        owners: Owners | None = None,
        keep_status: bool,
    ) -> _Event:
        """Store `new` with the server's metadata, record field ownership (`owners` from an apply, else the
        leaves `manager` changed) and the event, and wake the watchers. The lock is held."""
        if keep_status:  # main-resource writes never change status (the status subresource is on)
            new.pop("status", None)
            if old is not None and "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        meta = new.setdefault("metadata", {})
        old_meta = old["metadata"] if old else {}
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        meta["uid"] = old_meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = old_meta.get("creationTimestamp") or _now()
        generation = int(old_meta.get("generation", 0))
        meta["generation"] = generation + 1 if old is None or spec_part(old) != spec_part(new) else generation
        key = _key(res)
        stored = self._store.get(key) or _Stored(
            Resource(res.group, res.version, res.plural, res.namespace, res.name), new
        )
        stored.object = new
        if owners is not None:
            stored.owners = owners
        elif manager is not None:
            before = leaves(old) if old else {}
            for path, value in leaves(new).items():
                if before.get(path, MISSING) != value:
                    stored.owners[path] = {manager}
        current = leaves(new)
        stored.owners = {p: o for p, o in stored.owners.items() if p in current}
        self._store[key] = stored
        if new.get("kind"):
            self._kinds[(res.group, res.plural)] = new["kind"]
        return self._record_event("ADDED" if old is None else "MODIFIED", stored.resource, new)

    def _remove(self, stored: _Stored) -> _Event:
        del self._store[_key(stored.resource)]
        self._rv += 1
        gone = copy.deepcopy(stored.object)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        return self._record_event("DELETED", stored.resource, gone)

    def _record_event(self, kind: str, res: Resource, obj: Obj) -> _Event:
        event = _Event(self._rv, kind, res, obj)
        self._history.append(event)
        if len(self._history) > self.history_limit:
            drop = len(self._history) // 2
            self._compacted = self._history[drop - 1].rv
            del self._history[:drop]
        self._cond.notify_all()
        return event

    def _notify(self, event: _Event, old: Obj | None = None) -> None:
        """Run the hooks registered for the event's resource (outside the lock; errors are kept)."""
        with self._cond:
            hooks = [h for plural, h in self._hooks if event.resource.matches(plural)]
        for hook in hooks:
            try:
                hook(WriteEvent(event.type, event.resource, copy.deepcopy(event.object), copy.deepcopy(old)))
            except Exception as exc:
                self.hook_errors.append(exc)

    # -- the HTTP API -----------------------------------------------------------------------------------

    def _handle(self, method: str, path: str, query: dict[str, str], ctype: str, body: Any, headers: Any) -> Any:
        """Serve one request: a (code, body) pair, or an iterator of watch events."""
        if headers.get("Authorization") != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if path == "/version":
            return 200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake"}
        res = parse_path(path)
        if res is None or res.subresource not in (None, "status"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        verb = verb_of(method, res, query)
        self._authorize(verb, res)
        if verb in ("list", "watch"):
            return self._list_or_watch(res, query, watch=verb == "watch")
        if verb == "get":
            with self._cond:
                return 200, copy.deepcopy(self._get(res).object)
        if verb == "delete":
            return self._delete(res)
        if not isinstance(body, dict) and not (verb == "patch" and ctype == JSON_PATCH):
            raise bad_request("the request body must be an object")
        manager = query.get("fieldManager") or str(headers.get("User-Agent") or "unknown").split("/")[0]
        owners: Owners | None = None
        with self._cond:
            stored = self._store.get(_key(res)) if res.name else None
            if verb == "create":
                new = create_body(res, body)
                res = res.named(new["metadata"]["name"])
                if _key(res) in self._store:
                    raise already_exists(res)
            elif verb == "update":
                new = update_body(res, self._get(res).object, body)
            elif ctype == APPLY and res.subresource is None:
                new, owners = apply_body(
                    res,
                    stored.object if stored else None,
                    stored.owners if stored else {},
                    body,
                    query.get("fieldManager"),
                    force=query.get("force") == "true",
                )
            else:
                new = patch_body(res, stored.object if stored else None, body, ctype, query.get("fieldManager"))
            old = stored.object if stored else None
            if res.subresource == "status":
                assert old is not None  # _get / _patch_body answered 404 otherwise
                new = {**copy.deepcopy(old), "status": new.get("status")}
            code = 201 if old is None else 200
            if query.get("dryRun") == "All":
                return code, new
            status_write = res.subresource == "status"
            if old is not None and stored is not None and unchanged(old, new, status_write):
                if owners is not None:  # a no-op write stores nothing, bumps nothing, tells no watcher
                    stored.owners = owners
                return code, copy.deepcopy(old)
            event = self._commit(
                res, old, new, manager=None if status_write else manager, owners=owners, keep_status=not status_write
            )
            result = copy.deepcopy(event.object)
        self._notify(event, old)
        return code, result

    def _delete(self, res: Resource) -> tuple[int, Obj]:
        """Custom resources answer a delete with a `Status` Success; core ones with the deleted object."""
        with self._cond:
            stored = self._get(res)
            event = self._remove(stored)
        self._notify(event, stored.object)
        if not res.group:
            return 200, event.object
        info = {**details(res), "uid": event.object["metadata"]["uid"]}
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": info}

    def _authorize(self, verb: str, res: Resource) -> None:
        """403 with RBAC's message for a verb a test denied."""
        with self._cond:
            denied = any(v in (verb, "*") and res.matches(p) for v, p in self._denied)
        if not denied:
            return
        what = res.plural + (f"/{res.subresource}" if res.subresource else "")
        subject = f'{res.qualified} "{res.name}"' if res.name else res.qualified
        scope = f' in the namespace "{res.namespace}"' if res.namespace else " at the cluster scope"
        message = (
            f'{subject} is forbidden: User "{self.user}" cannot {verb} resource "{what}" '
            f'in API group "{res.group}"{scope}'
        )
        raise ApiError(403, "Forbidden", message, details(res))

    def _get(self, res: Resource) -> _Stored:
        stored = self._store.get(_key(res))
        if stored is None:
            raise not_found(res)
        return stored

    def _list_or_watch(self, res: Resource, query: dict[str, str], *, watch: bool) -> Any:
        by_label = label_selector(query.get("labelSelector", ""))
        fields = query.get("fieldSelector", "")
        if res.name:  # a watch on one object's URL: the legacy spelling of fieldSelector=metadata.name
            fields, res = ",".join(f for f in (fields, f"metadata.name={res.name}") if f), res.named(None)
        by_field = field_selector(fields)

        def match(obj: Obj) -> bool:
            return by_label(obj) and by_field(obj)

        if watch:
            timeout = query.get("timeoutSeconds")
            return self._watch(res, match, query.get("resourceVersion"), float(timeout) if timeout else None)
        with self._cond:
            found = [s for s in self._store.values() if in_scope(res, s.resource) and match(s.object)]
            items = [copy.deepcopy(s.object) for s in sorted(found, key=lambda s: _key(s.resource))]
            rv = str(self._rv)
        kind = self._kinds.get((res.group, res.plural), res.plural.removesuffix("s").capitalize()) + "List"
        return 200, {"apiVersion": res.api_version, "kind": kind, "metadata": {"resourceVersion": rv}, "items": items}

    def _watch(self, res: Resource, match: Selector, since: str | None, timeout_s: float | None) -> Iterator[Obj]:
        """Events for `res` after resourceVersion `since` (none or "0": the current objects as ADDED first),
        until the timeout, the server's stop, or a 410 ERROR event when the history no longer reaches back."""
        if since not in (None, "", "0") and not str(since).isdigit():
            raise bad_request(f'invalid resource version "{since}"')
        deadline = time.monotonic() + timeout_s if timeout_s else None
        with self._cond:
            if since in (None, "", "0"):
                cursor = self._rv
                found = [s for s in self._store.values() if in_scope(res, s.resource) and match(s.object)]
                found.sort(key=lambda s: _key(s.resource))
                initial = [{"type": "ADDED", "object": copy.deepcopy(s.object)} for s in found]
            else:
                cursor, initial = int(str(since)), []
        return self._watch_stream(res, match, cursor, initial, deadline)

    def _news_after(self, rv: int) -> bool:
        return self._stopped or self._rv > rv

    def _watch_stream(
        self, res: Resource, match: Selector, cursor: int, initial: list[Obj], deadline: float | None
    ) -> Iterator[Obj]:
        yield from initial
        while True:
            with self._cond:
                if cursor < self._compacted:
                    message = f"too old resource version: {cursor} ({self._compacted + 1})"
                    gone = {"type": "ERROR", "object": status_body(410, "Expired", message)}
                    batch: list[_Event] = []
                else:
                    gone = None
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    self._cond.wait_for(functools.partial(self._news_after, cursor), timeout=remaining)
                    if self._stopped:
                        return
                    start = bisect.bisect_right(self._history, cursor, key=lambda e: e.rv)
                    batch = [] if cursor < self._compacted else self._history[start:]
            if gone is not None:
                yield gone
                return
            for event in batch:
                cursor = event.rv
                if in_scope(res, event.resource) and match(event.object):
                    yield {"type": event.type, "object": copy.deepcopy(event.object)}
            if deadline is not None and time.monotonic() >= deadline:
                return


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # joined by FakeApiServer.stop() with a bound, not by server_close()
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], api: FakeApiServer) -> None:
        self.api = api
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), name="fake-apiserver-conn", daemon=True
        )
        with self.api._cond:
            self.api._threads = [t for t in self.api._threads if t.is_alive()] + [thread]
            self.api._connections.add(request)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self.api._cond:
            self.api._connections.discard(request)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the recorded requests are the log."""

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        api = self.server.api
        split = urlsplit(self.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            body: Any = None
            if raw:
                text = raw.decode()
                body = text
                body = yaml.safe_load(text) if ctype == APPLY else json.loads(text)
        except (ValueError, yaml.YAMLError) as exc:
            bad_body: ApiError | None = ApiError(400, "BadRequest", f"the request body is not valid: {exc}")
        else:
            bad_body = None
        with api._cond:
            api._requests.append(RecordedRequest(self.command, split.path, query, ctype, body, parse_path(split.path)))
        try:
            if bad_body is not None:
                raise bad_body
            result = api._handle(self.command, split.path, query, ctype, body, self.headers)
        except ApiError as exc:
            self._send(exc.code, exc.status())
            return
        except Exception as exc:  # a server bug: say so as Kubernetes would, keep serving
            self._send(500, status_body(500, "InternalError", f"fake API server error: {exc!r}"))
            return
        if isinstance(result, tuple):
            self._send(*result)
        else:
            self._stream(result)

    def _send(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: Iterator[Obj]) -> None:
        """A watch: one JSON event per line in a chunked body, then the connection closes."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for event in events:
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass  # the client went away
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
