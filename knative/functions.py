"""The pre-warm controller's view of the functions on a Knative cluster (`KnativeFunctionSource`).

Every kold Service in the namespace (label `app.kubernetes.io/part-of=kold`) is one function. Its
scaling spec is read from the Service's revision *template* (`service.scaling_of`), never from a
Revision: the controller raises a Revision's min-scale itself, and reading that back would feed its
own floors into its next plan. The pre-warm policy is the Service's `kold.dev/prewarm` annotation,
else the default policy.

A Service that cannot be read (an annotation someone edited into nonsense, a name kold would not
use as a Redis key) costs only itself: it is logged once, and the function keeps the view read
before (or is left out until it reads), so the controller does not take it for deleted and forget
its floor and demand. A failing API call (cluster away, RBAC) is the tick's problem: it raises.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from kold.controller.loop import FunctionView
from kold.controller.policies.registry import DEFAULT_POLICY
from kold.gateway.names import validate_function_name
from kold.knative import names
from kold.knative.service import scaling_of

log = logging.getLogger("kold.knative.functions")


class ServiceLister(Protocol):
    """What the source needs of `kold.knative.cluster.Cluster`."""

    def list_services(self, label_selector: str = ...) -> list[dict[str, Any]]: ...


class KnativeFunctionSource:
    """The cluster's kold Services as the controller's `FunctionSource` (a blocking `list`)."""

    def __init__(self, cluster: ServiceLister, default_policy: str = DEFAULT_POLICY) -> None:
        self.cluster = cluster
        self.default_policy = default_policy
        self._last: dict[str, FunctionView] = {}  # function -> its last view read
        self._unreadable: set[str] = set()  # functions logged as unreadable, until they read again

    def list(self) -> list[FunctionView]:
        services = self.cluster.list_services(names.KOLD_SELECTOR)  # an API error raises: the tick's
        views: list[FunctionView] = []
        last: dict[str, FunctionView] = {}
        listed: set[str] = set()
        for service in services:
            meta = service.get("metadata") if isinstance(service, dict) else None
            name = meta.get("name") if isinstance(meta, dict) else None
            if not isinstance(name, str):
                continue  # not a Kubernetes object: nothing to name it by
            listed.add(name)
            try:
                validate_function_name(name)  # it becomes Redis keys
                scaling = scaling_of(service)
                view = FunctionView(name, scaling, scaling.prewarm or self.default_policy)
            except Exception as exc:
                if name not in self._unreadable:
                    self._unreadable.add(name)
                    log.warning(
                        "Knative Service %s cannot be read as a kold function (%s); %s",
                        name,
                        exc,
                        "planned with the view read before" if name in self._last else "not planned",
                    )
                if name in self._last:
                    views.append(last.setdefault(name, self._last[name]))
                continue
            if name in self._unreadable:
                self._unreadable.discard(name)
                log.info("Knative Service %s reads again", name)
            last[name] = view
            views.append(view)
        self._last = last
        self._unreadable &= listed  # a deleted one is logged afresh if it comes back
        return views
