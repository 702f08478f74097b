"""A stand-in for Knative Serving's controllers, driving the fake API server (tests/knative/apiserver.py).

kold's Knative code reads what Knative writes: Revisions created from a Service's template, the Service's
conditions and its status (url, address, latest created/ready revision, traffic), each Revision's replica
count. A test needs those to appear the way Knative makes them appear, over time and through watches, and
needs Knative's failures (a missing image, a revision that never scales up) with their real reasons and
messages. `KnativeSim` does that in-process: it reacts to Service writes through the server's `on_write`
hook and moves conditions later from one timer thread.

Behaviour:
- A Service create, or an update whose `spec.template` changed, creates Revision `<name>-00001`,
  `-00002`, ... (or the template's own `metadata.name`) in the same namespace: the template's labels and
  annotations plus `serving.knative.dev/{service,configuration,configurationGeneration}` labels, the
  template's spec, conditions Unknown. The Service goes Unknown with `latestCreatedRevisionName` set.
- `ready_after_s` later, per the `fail` mode read when the Revision was created:
  None: Revision Ready, Service Ready with `latestReadyRevisionName`, `traffic` 100% to it, `url`, `address`;
  "image-pull": Revision Ready False ContainerMissing, Service ConfigurationsReady/Ready False RevisionFailed;
  "progress-deadline": Revision ResourcesAvailable/Ready False ProgressDeadlineExceeded
  ("Initial scale was never achieved"), Service likewise RevisionFailed; "never": stays Unknown.
  A failed new revision leaves the last ready one serving, as Knative does.
- A Service delete deletes its Revisions.
- Revisions report `actualReplicas` (default `replicas`=0: scaled to zero, Active False NoTraffic).

Public API: `KnativeSim(server, ready_after_s=0.2, fail=None, address_base=None, replicas=0)`;
attributes `ready_after_s`, `fail`, `address_base`, `replicas` may be changed between deploys;
`revisions(service, namespace)`, `set_replicas(revision, replicas, namespace)`, `settle(timeout_s)`
(wait until no transition is pending), `errors` (exceptions from timer actions), `close()`.
`status.address.url` is `http://<name>.<ns>.svc.cluster.local`, or `<address_base>/<ns>/<name>` when
`address_base` is given, so a test can point warm-up requests at a loopback HTTP server.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .apiserver import FakeApiServer, WriteEvent

Obj = dict[str, Any]
GROUP = "serving.knative.dev"
SERVICES = f"services.{GROUP}"
REVISIONS = f"revisions.{GROUP}"
SERVICE_LABEL = f"{GROUP}/service"
CONFIGURATION_LABEL = f"{GROUP}/configuration"
FAIL_MODES = (None, "image-pull", "progress-deadline", "never")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, status: str, reason: str = "", message: str = "") -> Obj:
    """One Knative condition, shaped as Knative writes it (reason and message only when set)."""
    cond: Obj = {"type": kind, "status": status, "lastTransitionTime": _now()}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def _failure(mode: str, image: str) -> tuple[str, str, list[str]]:
    """(reason, message, the Revision conditions that fail) for a failure mode, in Knative's words."""
    if mode == "image-pull":
        message = (
            f'Unable to fetch image "{image}": failed to resolve image to digest: '
            f"GET https://registry.example.com/v2/manifests/latest: MANIFEST_UNKNOWN: manifest unknown"
        )
        return "ContainerMissing", message, ["ContainerHealthy", "Ready"]
    return "ProgressDeadlineExceeded", "Initial scale was never achieved", ["ResourcesAvailable", "Ready"]


class KnativeSim:
    """Knative Serving's controllers, simulated against a `FakeApiServer` (see the module docstring)."""

    def __init__(
        self,
        server: FakeApiServer,
        *,
        ready_after_s: float = 0.2,
        fail: str | None = None,
        address_base: str | None = None,
        replicas: int = 0,
    ) -> None:
        if fail not in FAIL_MODES:
            raise ValueError(f"fail must be one of {FAIL_MODES}, not {fail!r}")
        self.server = server
        self.ready_after_s = ready_after_s
        self.fail = fail
        self.address_base = address_base
        self.replicas = replicas
        self.errors: list[BaseException] = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._templates: dict[tuple[str, str], Obj] = {}  # (namespace, service) -> the last template seen
        self._counters: dict[tuple[str, str], int] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="knative-sim", daemon=True)
        self._thread.start()
        server.on_write(SERVICES, self._on_service)

    # -- test controls ----------------------------------------------------------------------------------

    def close(self, join_s: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            self._timers.clear()
            self._wake.notify_all()
        self._thread.join(join_s)
        if self._thread.is_alive():
            raise RuntimeError(f"knative-sim thread still running after {join_s}s")

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until no condition transition is pending (TimeoutError after `timeout_s`)."""
        with self._lock:
            if not self._wake.wait_for(lambda: self._closed or not (self._timers or self._busy), timeout_s):
                raise TimeoutError(f"Knative sim still has {len(self._timers)} pending transitions after {timeout_s}s")

    def revisions(self, service: str, namespace: str) -> list[Obj]:
        """The service's Revisions, oldest first."""
        found = [
            r
            for r in self.server.objects(REVISIONS, namespace)
            if (r["metadata"].get("labels") or {}).get(SERVICE_LABEL) == service
        ]
        return sorted(found, key=lambda r: int(r["metadata"]["labels"][f"{GROUP}/configurationGeneration"]))

    def set_replicas(self, revision: str, replicas: int, namespace: str) -> Obj:
        """Set a Revision's actual (and desired) replicas, as the autoscaler would after scaling it."""
        rev = self.server.get_object(REVISIONS, namespace, revision)
        if rev is None:
            raise KeyError(f"revision {namespace}/{revision} not found")
        conditions = _replace(rev.get("status", {}).get("conditions", []), _active(replicas))
        status = {"actualReplicas": replicas, "desiredReplicas": replicas, "conditions": conditions}
        return self.server.set_status(REVISIONS, namespace, revision, status)

    # -- reacting to writes -----------------------------------------------------------------------------

    def _on_service(self, event: WriteEvent) -> None:
        meta = event.object["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            if self._closed:
                return
            if event.type == "DELETED":
                self._templates.pop(key, None)
                self._counters.pop(key, None)
                for rev in self.revisions(meta["name"], meta["namespace"]):
                    self.server.delete_object(REVISIONS, meta["namespace"], rev["metadata"]["name"])
                return
            template = (event.object.get("spec") or {}).get("template") or {}
            if key in self._templates and self._templates[key] == template:
                if (event.object.get("status") or {}).get("observedGeneration") != meta["generation"]:
                    self.server.set_status(SERVICES, *key, {"observedGeneration": meta["generation"]})
                return
            self._templates[key] = copy.deepcopy(template)
            self._new_revision(event.object, template)

    def _new_revision(self, service: Obj, template: Obj) -> None:
        meta = service["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        number = self._counters.get((namespace, name), 0) + 1
        self._counters[(namespace, name)] = number
        tmeta = template.get("metadata") or {}
        rev_name = tmeta.get("name") or f"{name}-{number:05d}"
        labels = {
            **(tmeta.get("labels") or {}),
            SERVICE_LABEL: name,
            CONFIGURATION_LABEL: name,
            f"{GROUP}/configurationGeneration": str(number),
            f"{GROUP}/serviceUID": meta["uid"],
        }
        owner = {"apiVersion": f"{GROUP}/v1", "kind": "Configuration", "name": name, "controller": True}
        revision = {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Revision",
            "metadata": {
                "name": rev_name,
                "namespace": namespace,
                "labels": labels,
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [{**owner, "uid": meta["uid"], "blockOwnerDeletion": True}],
            },
            "spec": copy.deepcopy(template.get("spec") or {}),
            "status": {
                "observedGeneration": 1,
                "conditions": [
                    condition(kind, "Unknown", "Deploying")
                    for kind in ("Active", "ContainerHealthy", "Ready", "ResourcesAvailable")
                ],
            },
        }
        self.server.put_object(revision, "revisions")
        status = self.server.get_object(SERVICES, namespace, name) or {}
        serving = (status.get("status") or {}).get("latestReadyRevisionName")
        waiting = f'Configuration "{name}" is waiting for a Revision to become ready.'
        routes = (
            condition("RoutesReady", "True")
            if serving
            else condition("RoutesReady", "Unknown", "RevisionMissing", waiting)
        )
        self.server.set_status(
            SERVICES,
            namespace,
            name,
            {
                "observedGeneration": meta["generation"],
                "latestCreatedRevisionName": rev_name,
                "conditions": [
                    condition("ConfigurationsReady", "Unknown"),
                    condition("Ready", "Unknown", "RevisionMissing", waiting),
                    routes,
                ],
            },
        )
        if self.fail != "never":
            image = ((template.get("spec") or {}).get("containers") or [{}])[0].get("image", "")
            mode = self.fail
            uid = meta["uid"]
            self._schedule(
                self.ready_after_s, lambda: self._settle_revision(namespace, name, uid, rev_name, mode, image)
            )

    def _settle_revision(
        self, namespace: str, name: str, uid: str, rev_name: str, mode: str | None, image: str
    ) -> None:
        """The revision's outcome: Ready, or failed with the mode's reason (skipped if it is gone)."""
        service = self.server.get_object(SERVICES, namespace, name)
        revision = self.server.get_object(REVISIONS, namespace, rev_name)
        if service is None or revision is None or service["metadata"]["uid"] != uid:
            return
        current = service.get("status") or {}
        latest = current.get("latestCreatedRevisionName") == rev_name
        if mode is None:
            rev_conditions = [condition(k, "True") for k in ("ContainerHealthy", "Ready", "ResourcesAvailable")]
            rev_status: Obj = {"conditions": [*rev_conditions, _active(self.replicas)]}
            rev_status |= {"actualReplicas": self.replicas, "desiredReplicas": self.replicas}
            self.server.set_status(REVISIONS, namespace, rev_name, rev_status)
            if latest:
                self.server.set_status(SERVICES, namespace, name, self._ready_status(service, rev_name))
            return
        reason, message, failing = _failure(mode, image)
        rev_conditions = [
            condition(k, "False", reason, message) if k in failing else condition(k, "Unknown", "Deploying")
            for k in ("Active", "ContainerHealthy", "Ready", "ResourcesAvailable")
        ]
        self.server.set_status(REVISIONS, namespace, rev_name, {"conditions": rev_conditions, "actualReplicas": 0})
        if not latest:
            return
        failed = f'Revision "{rev_name}" failed with message: {message}.'
        serving = current.get("latestReadyRevisionName")
        no_ready = f'Configuration "{name}" does not have any ready Revision.'
        routes = (
            condition("RoutesReady", "True")
            if serving
            else condition("RoutesReady", "False", "RevisionMissing", no_ready)
        )
        conditions = [
            condition("ConfigurationsReady", "False", "RevisionFailed", failed),
            condition("Ready", "False", "RevisionFailed", failed),
            routes,
        ]
        self.server.set_status(SERVICES, namespace, name, {"conditions": conditions})

    def _ready_status(self, service: Obj, rev_name: str) -> Obj:
        meta = service["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        if self.address_base:
            address = f"{self.address_base.rstrip('/')}/{namespace}/{name}"
        else:
            address = f"http://{name}.{namespace}.svc.cluster.local"
        return {
            "observedGeneration": meta["generation"],
            "latestCreatedRevisionName": rev_name,
            "latestReadyRevisionName": rev_name,
            "url": f"http://{name}.{namespace}.example.com",
            "address": {"url": address},
            "traffic": [{"revisionName": rev_name, "latestRevision": True, "percent": 100}],
            "conditions": [condition(k, "True") for k in ("ConfigurationsReady", "Ready", "RoutesReady")],
        }

    # -- the timer thread -------------------------------------------------------------------------------

    def _schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                return
            heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._seq), action))
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (not self._timers or self._timers[0][0] > time.monotonic()):
                    timeout = self._timers[0][0] - time.monotonic() if self._timers else None
                    self._wake.wait(timeout)
                if self._closed:
                    return
                _, _, action = heapq.heappop(self._timers)
                self._busy = True
                try:
                    action()
                except Exception as exc:
                    self.errors.append(exc)
                finally:
                    self._busy = False
                    self._wake.notify_all()


def _active(replicas: int) -> Obj:
    if replicas > 0:
        return condition("Active", "True")
    return condition("Active", "False", "NoTraffic", "The target is not receiving traffic.")


def _replace(conditions: list[Obj], new: Obj) -> list[Obj]:
    return [c for c in conditions if c.get("type") != new["type"]] + [new]
