"""The node agent's DaemonSet, the function's mount of its directory, and the controller's Deployment and RBAC.

What ties them together is checked here: the agent and the functions mount the same host directory and
agree on where the tier and the pool are, the function template says what `kold deploy --target knative`
renders (kold.knative.service), the agent's memory covers the tier it fills, and the controller's Role
grants exactly the Kubernetes calls the controller's code makes.
"""

from __future__ import annotations

import re

import pytest

from kold.knative import service as knative_service
from kold.settings import parse_size

from .render import OVERLAYS, REPO, Doc, env_of, knative_services, needs_kubectl, render, the

AGENT = "kold-node-agent"


def agent_pod(overlay: str) -> Doc:
    pod: Doc = the(render(overlay), "DaemonSet", AGENT)["spec"]["template"]["spec"]
    return pod


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (Mi, Gi, M, G or plain bytes) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?", text)
    assert match, text
    unit = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9}
    return int(match.group(1)) * unit.get(match.group(2), 10**12)


def knative_defaults(pod: Doc) -> Doc:
    """What Knative's defaulting webhook makes of a function's pod spec's mounts (restated from
    pkg/apis/serving/v1/revision_defaults.go, not copied): every mount of a volume that is not an
    emptyDir, a PVC or an ephemeral volume becomes readOnly."""
    writable = {
        v["name"] for v in pod.get("volumes", []) if {"emptyDir", "persistentVolumeClaim", "ephemeral"} & v.keys()
    }
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in writable:
                mount["readOnly"] = True
    return pod


# -- the agent -----------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_agent_runs_on_every_node_with_its_host_directory(overlay: str) -> None:
    pod = agent_pod(overlay)
    (container,) = pod["containers"]
    assert container["args"][:2] == ["node", "serve"]
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"  # the kubelet probes the pod's address
    port = int(args[args.index("--port") + 1])
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    (volume,) = [v for v in pod["volumes"] if "hostPath" in v]
    assert volume["hostPath"] == {"path": "/dev/shm/kold-node", "type": "DirectoryOrCreate"}
    env = env_of(container)
    assert env["KOLD_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert {"secretRef": {"name": "kold-s3"}} in container["envFrom"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    # the agent's Redis is the functions' and the controller's
    (function,) = knative_services(render(overlay))
    assert env["KOLD_REDIS_URL"] == env_of(function["spec"]["template"]["spec"]["containers"][0])["KOLD_REDIS_URL"]
    controller = the(render(overlay), "Deployment", "kold-controller")["spec"]["template"]["spec"]["containers"][0]
    assert env["KOLD_REDIS_URL"] == env_of(controller)["KOLD_REDIS_URL"]


@needs_kubectl
def test_the_agent_runs_as_a_user_and_only_its_first_step_as_root() -> None:
    pod = agent_pod("cpu")
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001
    assert context["capabilities"] == {"drop": ["ALL"]} and context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    (init,) = pod["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert "chown 10001:10001" in init["command"][-1]  # the directories become the agent's uid's
    assert pod["automountServiceAccountToken"] is False  # it never calls the Kubernetes API
    account = the(render("cpu"), "ServiceAccount", AGENT)
    assert pod["serviceAccountName"] == AGENT and account["automountServiceAccountToken"] is False
    assert not [d for d in render("cpu") if d["kind"] == "RoleBinding" and d["subjects"][0]["name"] == AGENT]


@needs_kubectl
def test_the_agents_memory_covers_the_tier_it_fills() -> None:
    (container,) = agent_pod("cpu")["containers"]
    env = env_of(container)
    held = parse_size(env["KOLD_CACHE_SHM_BYTES"])
    if env.get("KOLD_HOST_POOL", "auto") != "off":
        held += parse_size(env["KOLD_HOST_POOL_MAX_BYTES"])
    limit = quantity_bytes(container["resources"]["limits"]["memory"])
    # tmpfs pages are charged to the cgroup that wrote them: the agent's, up to the whole tier
    assert limit >= held + (256 << 20)
    assert quantity_bytes(container["resources"]["requests"]["memory"]) == limit  # the scheduler counts it all


# -- the function and the agent agree -----------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_function_mounts_the_agents_directory_read_only_where_its_env_looks(overlay: str) -> None:
    (ksvc,) = knative_services(render(overlay))
    pod = ksvc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    agent = agent_pod(overlay)
    (agent_volume,) = [v for v in agent["volumes"] if "hostPath" in v]
    assert volume["hostPath"]["path"] == agent_volume["hostPath"]["path"]
    assert mount["readOnly"] is True  # as Knative makes it anyway: the pod never writes there
    (agent_mount,) = [m for m in agent["containers"][0]["volumeMounts"] if m["name"] == agent_volume["name"]]
    # the same host directory, at the same place in both containers: the paths in env mean the same
    assert mount["mountPath"] == agent_mount["mountPath"] == "/kold-node"
    env, agent_env = env_of(container), env_of(agent["containers"][0])
    assert env["KOLD_CACHE_SHM_DIR"] == agent_env["KOLD_CACHE_SHM_DIR"] == "/kold-node/cache"
    assert env["KOLD_HOST_POOL_DIR"] == agent_env["KOLD_HOST_POOL_DIR"] == "/kold-node/pool"


@needs_kubectl
def test_the_function_template_mounts_what_kold_deploy_renders() -> None:
    (ksvc,) = knative_services(render("cpu"))
    template = knative_defaults(ksvc["spec"]["template"]["spec"])
    fn = knative_service.FunctionDeploy(
        name="kold-function",
        image="ghcr.io/kold/kold-runtime:0.1.0",
        snapshot_uri="s3://kold/snapshots/" + "0" * 32,
        snapshot_id="0" * 32,
        snapshot_bytes=1 << 30,
        node_cache=True,
        redis_url="redis://kold-redis:6379/0",
    )
    rendered = knative_defaults(knative_service.render_service(fn)["spec"]["template"]["spec"])
    assert template["volumes"] == rendered["volumes"]
    (ours,), (theirs,) = template["containers"], rendered["containers"]
    assert ours["volumeMounts"] == theirs["volumeMounts"]
    for name in ("KOLD_CACHE_SHM_DIR", "KOLD_HOST_POOL_DIR", "KOLD_CACHE_DISK_BYTES", "KOLD_REDIS_URL"):
        assert env_of(ours)[name] == env_of(theirs)[name], name
    assert ours["envFrom"] == theirs["envFrom"]


# -- the controller ----------------------------------------------------------------------------------

# Every Cluster method that calls the API, and the RBAC (resource, verb) pairs it needs
# (knative/cluster.py: apply is a server-side apply patch, or get -> create | update where refused).
CLUSTER_CALLS = {
    "get_service": {("services", "get")},
    "list_services": {("services", "list")},
    "watch_service": {("services", "watch")},
    "apply_service": {("services", "patch"), ("services", "get"), ("services", "create"), ("services", "update")},
    "delete_service": {("services", "delete")},
    "get_revision": {("revisions", "get")},
    "list_revisions": {("revisions", "list")},
    "patch_revision_annotations": {("revisions", "patch")},
}
# the code `kold controller --target knative` runs: its command, its function source and its actuator
CONTROLLER_CODE = ("kold/commands/controller.py", "knative/functions.py", "knative/actuator.py")


def controller_calls() -> set[tuple[str, str]]:
    """The (resource, verb) pairs the controller's code needs: every `cluster.<method>` it names."""
    needed: set[tuple[str, str]] = set()
    for path in CONTROLLER_CODE:
        for method in re.findall(r"\bcluster\.(\w+)", (REPO / path).read_text()):
            needed |= CLUSTER_CALLS.get(method, set())
    return needed


def test_every_api_method_of_the_cluster_client_is_known_here() -> None:
    source = (REPO / "knative" / "cluster.py").read_text()
    public = set(re.findall(r"^    def ([a-z]\w*)\(self", source, re.MULTILINE))
    assert public - {"close"} == set(CLUSTER_CALLS)  # a new API method needs its verbs listed above


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_controller_role_grants_exactly_what_the_controller_calls(overlay: str) -> None:
    docs = render(overlay)
    role = the(docs, "Role", "kold-controller")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    granted = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["serving.knative.dev"] and "resourceNames" not in rule
        granted |= {(resource, verb) for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == controller_calls()
    assert granted == {("services", "get"), ("services", "list"), ("revisions", "get"), ("revisions", "list"),
                       ("revisions", "patch")}  # fmt: skip
    binding = the(docs, "RoleBinding", "kold-controller")
    deployment = the(docs, "Deployment", "kold-controller")
    (subject,) = binding["subjects"]
    assert subject["name"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kold-controller"}


@needs_kubectl
def test_the_controller_acts_on_knative_and_serves_metrics_to_the_pod_network() -> None:
    (container,) = the(render("cpu"), "Deployment", "kold-controller")["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "controller" and args[args.index("--target") + 1] == "knative"
    assert args[args.index("--metrics-host") + 1] == "0.0.0.0"
    port = int(args[args.index("--metrics-port") + 1])
    assert container["ports"] == [{"name": "metrics", "containerPort": port}]
