"""The Kubernetes API as kold uses it: Knative Services and Revisions in one namespace.

Every call goes through the official `kubernetes` client (`CustomObjectsApi` on an `ApiClient` of
our own: `new_client_from_config` for a kubeconfig, `load_incluster_config` into a `Configuration`
in a pod), so nothing here touches the client's global configuration and two clusters can be
driven side by side. All calls block; async callers use `asyncio.to_thread`.

What can go wrong becomes a `KnativeError` whose message is one line a user can act on: which verb
on which resource RBAC must allow, that Knative Serving is not installed, which API server could
not be reached and which kubeconfig and context named it, how to point kold at a cluster at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kold.controller.loop import OneLineError
from kold.knative import names

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, CustomObjectsApi

log = logging.getLogger(__name__)

Doc = dict[str, Any]

FIELD_MANAGER = "kold"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"  # a JSON body is valid YAML
MERGE_CONTENT_TYPE = "application/merge-patch+json"
REQUEST_TIMEOUT_S = 30.0  # one API call; a watch gets its own, longer, bound
CONFLICT_RETRIES = 5  # replace with a stale resourceVersion: re-read and try again this often
POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
SERVICES = f"{names.SERVICES}.{names.GROUP}"  # services.serving.knative.dev
REVISIONS = f"{names.REVISIONS}.{names.GROUP}"


class KnativeError(OneLineError):
    """Anything the cluster refused or could not do; the message is one line a user can act on."""


class NotFound(KnativeError):  # noqa: N818 (the shared interface's name)
    """The named object does not exist."""


class Forbidden(KnativeError):  # noqa: N818
    """RBAC refused a verb; the message says which verb on which resource, in which namespace."""


class Conflict(KnativeError):  # noqa: N818
    """A write lost to a concurrent one (stale resourceVersion) or the object already exists."""


class NotInstalled(KnativeError):  # noqa: N818
    """The cluster does not serve the Knative Serving API (no services.serving.knative.dev)."""


class Gone(KnativeError):  # noqa: N818
    """A watch's resourceVersion is too old (410): re-read the object and watch from its version."""


@dataclass(frozen=True)
class ClusterConfig:
    """Which cluster: a kubeconfig context (None: the kubeconfig's current one), a namespace (None:
    the context's, else the pod's own, else "default") and a kubeconfig file (None: the kubernetes
    client's default, `$KUBECONFIG` or `~/.kube/config`; with none there, the pod's service account)."""

    context: str | None = None
    namespace: str | None = None
    kubeconfig: str | None = None


class Cluster:
    """One namespace of one cluster, through one ApiClient (close it when done)."""

    namespace: str

    def __init__(self, config: ClusterConfig) -> None:
        from kubernetes.client import CustomObjectsApi

        self._config = config
        self._api_client, self.source, context_namespace, self.user = _connect(config)
        self.server: str = self._api_client.configuration.host
        self.namespace = config.namespace or context_namespace or _pod_namespace() or "default"
        self._api: CustomObjectsApi = CustomObjectsApi(self._api_client)

    # -- Services ---------------------------------------------------------------------------------

    def get_service(self, name: str) -> Doc:
        return self._call(
            "get", SERVICES, name, self._api.get_namespaced_custom_object, *self._at(names.SERVICES), name
        )

    def list_services(self, label_selector: str = names.KOLD_SELECTOR) -> list[Doc]:
        listed = self._call(
            "list",
            SERVICES,
            None,
            self._api.list_namespaced_custom_object,
            *self._at(names.SERVICES),
            label_selector=label_selector,
        )
        return [item for item in listed.get("items") or [] if isinstance(item, dict)]

    def apply_service(self, body: Doc, *, server_side: bool = True) -> Doc:
        """Create or update the Service to `body`: server-side apply (fieldManager "kold", force),
        or, where the server refuses apply (415) or `server_side` is False, get → create | replace
        with the resourceVersion read, retried when a concurrent write makes that version stale (409)."""
        name = str(body["metadata"]["name"])
        body = {**body, "metadata": {**body["metadata"], "namespace": self.namespace}}
        if not server_side:
            return self._create_or_replace(name, body)
        try:
            applied = self._call(
                "patch",
                SERVICES,
                name,
                self._api.patch_namespaced_custom_object,
                *self._at(names.SERVICES),
                name,
                body,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY_CONTENT_TYPE,
            )
            # an apply that creates answers 201, which the client hands back as no object: read it
            return applied or self.get_service(name)
        except _UnsupportedError:
            log.info("the API server refuses server-side apply: create or replace %s instead", name)
        return self._create_or_replace(name, body)

    def _create_or_replace(self, name: str, body: Doc) -> Doc:
        for attempt in range(CONFLICT_RETRIES):
            try:
                current = self.get_service(name)
            except NotFound:
                try:
                    return self._call(
                        "create",
                        SERVICES,
                        name,
                        self._api.create_namespaced_custom_object,
                        *self._at(names.SERVICES),
                        body,
                        field_manager=FIELD_MANAGER,
                    )
                except Conflict:  # created by someone else meanwhile: replace theirs
                    continue
            replacement = _over(current, body)
            try:
                return self._call(
                    "update",
                    SERVICES,
                    name,
                    self._api.replace_namespaced_custom_object,
                    *self._at(names.SERVICES),
                    name,
                    replacement,
                    field_manager=FIELD_MANAGER,
                )
            except Conflict:
                log.info("%s changed while it was replaced (attempt %d): reading it again", name, attempt + 1)
                time.sleep(0.05 * (attempt + 1))
        raise Conflict(
            f"service {name} in namespace {self.namespace} kept changing while kold replaced it "
            f"({CONFLICT_RETRIES} tries): try again"
        )

    def delete_service(self, name: str) -> None:
        self._call("delete", SERVICES, name, self._api.delete_namespaced_custom_object, *self._at(names.SERVICES), name)

    def watch_service(self, name: str, resource_version: str | None, timeout_s: float) -> Iterator[tuple[str, Doc]]:
        """The Service's watch events (ADDED, MODIFIED, DELETED) from `resource_version`, until the
        server ends the stream (at most `timeout_s`). Raises Gone when that version is too old."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        kwargs: dict[str, Any] = {
            "field_selector": f"metadata.name={name}",
            "timeout_seconds": max(1, int(timeout_s)),
            "_request_timeout": (REQUEST_TIMEOUT_S, max(1.0, timeout_s) + 10),
        }
        if resource_version:
            kwargs["resource_version"] = resource_version
        watcher: Any = watch.Watch()  # type: ignore[no-untyped-call]
        stream: Generator[Any, None, None] = watcher.stream(
            self._api.list_namespaced_custom_object, *self._at(names.SERVICES), **kwargs
        )
        try:
            while True:
                try:
                    event = next(stream)
                except StopIteration:
                    return
                except ApiException as exc:
                    if exc.status == 410:
                        raise Gone(f"watch of service {name}: resourceVersion {resource_version} is gone") from None
                    self._raise(exc, "watch", SERVICES, name)
                except Exception as exc:  # urllib3's errors: refused, reset, timed out
                    self._raise_transport(exc)
                if not isinstance(event, dict) or event.get("type") == "BOOKMARK":
                    continue
                obj = event.get("raw_object")
                if isinstance(obj, dict):
                    yield str(event.get("type")), obj
        finally:
            watcher.stop()
            stream.close()  # closes the response

    # -- Revisions --------------------------------------------------------------------------------

    def get_revision(self, name: str) -> Doc:
        return self._call(
            "get", REVISIONS, name, self._api.get_namespaced_custom_object, *self._at(names.REVISIONS), name
        )

    def list_revisions(self, service: str) -> list[Doc]:
        listed = self._call(
            "list",
            REVISIONS,
            None,
            self._api.list_namespaced_custom_object,
            *self._at(names.REVISIONS),
            label_selector=f"{names.SERVICE_LABEL}={service}",
        )
        return [item for item in listed.get("items") or [] if isinstance(item, dict)]

    def patch_revision_annotations(self, name: str, annotations: dict[str, str | None]) -> Doc:
        """Merge-patch the Revision's metadata.annotations (a None value deletes that annotation)."""
        return self._call(
            "patch",
            REVISIONS,
            name,
            self._api.patch_namespaced_custom_object,
            *self._at(names.REVISIONS),
            name,
            {"metadata": {"annotations": annotations}},
            _content_type=MERGE_CONTENT_TYPE,
        )

    def close(self) -> None:
        self._api_client.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- errors -----------------------------------------------------------------------------------

    def _at(self, plural: str) -> tuple[str, str, str, str]:
        return names.GROUP, names.VERSION, self.namespace, plural

    def _call(self, verb: str, resource: str, name: str | None, method: Any, *args: Any, **kwargs: Any) -> Doc:
        from kubernetes.client.exceptions import ApiException

        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT_S)
        try:
            result = method(*args, **kwargs)
        except ApiException as exc:
            self._raise(exc, verb, resource, name)
        except Exception as exc:
            self._raise_transport(exc)
        return result if isinstance(result, dict) else {}

    def _raise(self, exc: Any, verb: str, resource: str, name: str | None) -> NoReturn:
        status = int(exc.status or 0)
        body = _status_body(exc.body)
        message = str(body.get("message") or exc.reason or "").strip().replace("\n", " ")
        what = f"{resource.split('.', maxsplit=1)[0][:-1]} {name}" if name else resource
        where = f"in namespace {self.namespace}"
        if status == 403:
            user = _forbidden_user(message) or self.user
            raise Forbidden(f"forbidden: {user} cannot {verb} {resource} {where} — RBAC must allow it") from None
        if status == 404:
            details = body.get("details")
            details = details if isinstance(details, dict) else {}
            if name is not None and body.get("reason") == "NotFound" and details.get("name") == name:
                raise NotFound(f"no {what} {where}") from None
            if resource in (SERVICES, REVISIONS):
                raise NotInstalled(
                    f"Knative Serving is not installed on this cluster (no {resource}) at {self.server} ({self.source})"
                ) from None
            raise NotFound(f"no {what} {where}") from None
        if status == 409:
            raise Conflict(f"conflict on {what} {where}: {message}") from None
        if status == 415:
            raise _UnsupportedError(message)
        if status == 401:
            raise KnativeError(
                f"unauthorized: {self.server} refused the credentials of {self.source} (expired? log in again)"
            ) from None
        if status in (400, 422):
            raise KnativeError(f"the cluster refused {what}: {message}") from None
        raise KnativeError(
            f"{verb} {what} {where}: the API server at {self.server} answered {status or '?'} {message}".rstrip()
        ) from None

    def _raise_transport(self, exc: Exception) -> NoReturn:
        import urllib3.exceptions

        if not isinstance(exc, urllib3.exceptions.HTTPError | OSError):
            raise exc
        reason = getattr(exc, "reason", None) or exc
        text = str(reason)
        if "refused" in text.lower():
            text = "connection refused"
        elif "timed out" in text.lower() or isinstance(reason, urllib3.exceptions.TimeoutError):
            text = "timed out"
        else:
            text = text.split(": ", 1)[-1][:160]
        raise KnativeError(f"cannot reach the Kubernetes API server at {self.server} ({self.source}): {text}") from None


class _UnsupportedError(KnativeError):
    """415: the server does not take this patch type (an API server without server-side apply)."""


def _connect(config: ClusterConfig) -> tuple[ApiClient, str, str | None, str]:
    """An ApiClient for the config; also where it came from (for messages), the context's namespace
    and the user the credentials belong to (for 403 messages)."""
    from kubernetes import config as kconfig
    from kubernetes.client import ApiClient, Configuration
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.kube_config import ENV_KUBECONFIG_PATH_SEPARATOR, KUBE_CONFIG_DEFAULT_LOCATION

    explicit = config.kubeconfig is not None
    location = config.kubeconfig or KUBE_CONFIG_DEFAULT_LOCATION
    paths = [os.path.expanduser(p) for p in location.split(ENV_KUBECONFIG_PATH_SEPARATOR) if p]
    found = [p for p in paths if os.path.isfile(p)]
    if explicit and not found:
        raise KnativeError(f"kubeconfig {config.kubeconfig}: no such file")
    if found:
        try:
            contexts, current = kconfig.list_kube_config_contexts(location)  # type: ignore[no-untyped-call]
            chosen = config.context or (current or {}).get("name")
            entry = next((c for c in contexts or [] if c.get("name") == chosen), None)
            if config.context and entry is None:
                known = ", ".join(sorted(str(c.get("name")) for c in contexts or [])) or "none"
                raise KnativeError(f"kubeconfig {location}: no context {config.context!r} (contexts: {known})")
            details = (entry or {}).get("context") or {}
            api_client = kconfig.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=location, context=config.context, persist_config=False
            )
        except ConfigException as exc:
            raise KnativeError(f"kubeconfig {location}: {_one_line(exc)}") from None
        source = f"kubeconfig {location}, context {chosen}" if chosen else f"kubeconfig {location}"
        return api_client, source, details.get("namespace"), f'user "{details.get("user") or "?"}"'
    if config.context:
        raise KnativeError(
            f"--context {config.context}: there is no kubeconfig ({location}); set KUBECONFIG to the file that has it"
        )
    configuration = Configuration()
    try:
        kconfig.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except ConfigException:
        raise KnativeError(
            f"no cluster to talk to: no kubeconfig at {location} and not running in a pod; "
            "set KUBECONFIG (or pass --kubeconfig/--context) to point kold at a cluster"
        ) from None
    return ApiClient(configuration), "the pod's service account", None, "this pod's service account"


def _pod_namespace() -> str | None:
    try:
        return POD_NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None


def _over(current: Doc, body: Doc) -> Doc:
    """`body` as a replacement of `current`: current's resourceVersion (so a concurrent write is a
    409, not lost), and the labels and annotations others put on it kept beside kold's."""
    meta = current.get("metadata") or {}
    ours = body.get("metadata") or {}
    kold_keys = {names.SNAPSHOT_URI, names.SNAPSHOT_ID, names.SNAPSHOT_BYTES, names.PREWARM}
    theirs = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in kold_keys}
    return {
        **body,
        "metadata": {
            **ours,
            "resourceVersion": meta.get("resourceVersion"),
            "labels": {**(meta.get("labels") or {}), **(ours.get("labels") or {})},
            "annotations": {**theirs, **(ours.get("annotations") or {})},
        },
    }


def _status_body(body: Any) -> Doc:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str):
        return {}
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


_USER = re.compile(r'User "([^"]+)"')


def _forbidden_user(message: str) -> str | None:
    match = _USER.search(message)
    return f'user "{match.group(1)}"' if match else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
