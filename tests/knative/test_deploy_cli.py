"""`kold deploy|ls|describe|rm --target knative`, driven as a user drives them (`kold.cli.main`, and the
installed `kold` in a subprocess), against the fake API server with Knative simulated, publishing a
generated model to a real S3 server on loopback (rclone, tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifests.test_manifests import all_errors

from kold.cli import main
from kold.knative import names
from kold.locals3 import LocalS3Server
from kold.snapshot.store import manifest_key, open_store

from .apiserver import FakeApiServer
from .conftest import NAMESPACE
from .knative_sim import KnativeSim

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]

KOLD = Path(sys.executable).with_name("kold")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kold.modelgen import write_random_model

    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", "llama", "tiny")


@pytest.fixture
def store(s3_server: LocalS3Server, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """KOLD_STORE on a fresh bucket of the loopback S3 server; KOLD_HOME private; no KOLD_KNATIVE_*."""
    bucket = f"kn-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    monkeypatch.setenv("KOLD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KOLD_STORE", f"s3://{bucket}/kold")
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_env["AWS_DEFAULT_REGION"])
    for name in ("KOLD_KNATIVE_NAMESPACE", "KOLD_KNATIVE_CONTEXT", "KOLD_KNATIVE_WAIT_S", "KOLD_KNATIVE_IMAGE"):
        monkeypatch.delenv(name, raising=False)
    return f"s3://{bucket}/kold"


class Run:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    @property
    def error(self) -> str:
        """The one `kold: error:` line (and it is the only line that says error)."""
        lines = [line for line in self.err.splitlines() if line.startswith("kold: error:")]
        assert len(lines) == 1, self.err
        return lines[0]


@pytest.fixture
def kold(capsys: pytest.CaptureFixture[str], kubeconfig: Path) -> Any:
    def run(*argv: str, cluster: bool = True) -> Run:
        capsys.readouterr()
        extra = ["--kubeconfig", str(kubeconfig)] if cluster and "--target" in argv else []
        rc = main([*argv, *extra])
        captured = capsys.readouterr()
        return Run(rc, captured.out, captured.err)

    return run


def deploy(kold: Any, model: Path, *flags: str) -> Run:
    return kold("deploy", str(model), "--name", "tiny", "--target", "knative", *flags)


def service(apiserver: FakeApiServer, namespace: str = NAMESPACE) -> dict[str, Any]:
    svc = apiserver.get_object("services", namespace, "tiny")
    assert svc is not None
    return svc


def test_deploy_publishes_applies_waits_and_prints_the_url(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim, s3_server: LocalS3Server
) -> None:
    run = deploy(kold, model, "--max-instances", "3", "--prewarm", "forecast:budget=300")
    assert run.rc == 0, run.err
    url = f"http://tiny.{NAMESPACE}.example.com"
    assert run.out == f"  {url}\n  OpenAI clients: base_url={url}/v1, model=tiny\n"
    assert "Ready: " + url in run.err and "waiting for tiny to be Ready" in run.err
    assert [r for r in apiserver.requests if r.query.get("watch") == "true"]  # it followed the Service
    (apply,) = apiserver.calls("PATCH", "services", "tiny")
    assert apply.content_type.startswith("application/apply-patch+yaml")
    assert apply.query["fieldManager"] == "kold" and apply.query["force"] == "true"
    assert all_errors(apply.body) == []  # what went to the cluster passes Knative's schema and webhook rules
    svc = service(apiserver)
    uri = svc["metadata"]["annotations"][names.SNAPSHOT_URI]
    assert uri.startswith(f"{store}/snapshots/")
    snapshot_id = svc["metadata"]["annotations"][names.SNAPSHOT_ID]
    assert open_store(store, s3_server.options()).exists(manifest_key(snapshot_id))  # published, really
    assert svc["metadata"]["annotations"][names.PREWARM] == "forecast:budget=300"
    template = svc["spec"]["template"]
    assert template["metadata"]["annotations"][names.MAX_SCALE] == "3"
    assert template["spec"]["containers"][0]["args"][3] == uri


def test_redeploy_updates_the_service_into_a_second_revision(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim
) -> None:
    assert deploy(kold, model).rc == 0
    again = deploy(kold, model, "--max-instances", "6", "-o", "json")
    assert again.rc == 0, again.err
    assert "already in the store" in again.err  # the same snapshot, not uploaded twice
    doc = json.loads(again.out)
    assert doc["revision"] == "tiny-00002" and doc["ready"] is True and doc["namespace"] == NAMESPACE
    assert doc["openai_base_url"] == f"http://tiny.{NAMESPACE}.example.com/v1"
    assert [r["metadata"]["name"] for r in knative.revisions("tiny", NAMESPACE)] == ["tiny-00001", "tiny-00002"]
    assert service(apiserver)["metadata"]["generation"] == 2


def test_an_image_that_cannot_be_pulled_is_one_line_naming_it(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim
) -> None:
    knative.fail = "image-pull"
    run = deploy(kold, model, "--image", "registry.example/missing:9")
    assert run.rc == 1
    assert run.error.startswith("kold: error: tiny is not Ready: the image could not be pulled (revision tiny-00001: ")
    assert 'Unable to fetch image "registry.example/missing:9"' in run.error
    assert run.out == ""


def test_a_revision_past_its_progress_deadline_is_said_plainly(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim
) -> None:
    knative.fail = "progress-deadline"
    run = deploy(kold, model)
    assert run.rc == 1
    assert run.error == (
        "kold: error: tiny is not Ready: it did not become ready within its progress deadline "
        "(revision tiny-00001: ResourcesAvailable False: ProgressDeadlineExceeded: Initial scale was never achieved)"
    )


def test_waiting_ends_at_knative_wait_s(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    knative.fail = "never"
    monkeypatch.setenv("KOLD_KNATIVE_WAIT_S", "1.5")
    run = deploy(kold, model)
    assert run.rc == 1
    assert run.error.startswith("kold: error: timed out after 2 s waiting for tiny to be Ready (last: ")
    assert "kold describe tiny --target knative" in run.error


def test_no_wait_applies_and_returns(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim
) -> None:
    knative.fail = "never"
    run = deploy(kold, model, "--no-wait", "-o", "yaml")
    assert run.rc == 0, run.err
    assert yaml.safe_load(run.out)["ready"] is False
    assert "not waiting for tiny to be Ready" in run.err
    assert not [r for r in apiserver.requests if r.query.get("watch") == "true"]  # no wait, no watch


def test_forbidden_is_one_line_and_nothing_is_uploaded_first(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim, s3_server: LocalS3Server
) -> None:
    apiserver.deny("get", "services")
    run = deploy(kold, model)
    assert run.rc == 1
    assert run.error == (
        f'kold: error: forbidden: user "{apiserver.user}" cannot get services.serving.knative.dev in namespace '
        f"{NAMESPACE} — RBAC must allow it"
    )
    assert open_store(store, s3_server.options()).list_keys("snapshots") == []
    apiserver.allow("get", "services")
    apiserver.deny("patch", "services")
    run = deploy(kold, model)
    assert run.rc == 1 and "cannot patch services.serving.knative.dev" in run.error


def test_dry_run_prints_valid_yaml_with_the_real_snapshot_uri_and_touches_nothing(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim, s3_server: LocalS3Server
) -> None:
    run = deploy(kold, model, "--dry-run", "--namespace", "ml", "--device", "cuda")
    assert run.rc == 0, run.err
    doc = yaml.safe_load(run.out)
    assert all_errors(doc) == []
    assert doc["metadata"]["namespace"] == "ml"
    assert doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert apiserver.requests == []  # no cluster contacted
    assert open_store(store, s3_server.options()).list_keys("snapshots") == []  # nothing uploaded
    # the URI it printed is the one a deploy publishes
    assert deploy(kold, model).rc == 0
    assert (
        service(apiserver)["metadata"]["annotations"][names.SNAPSHOT_URI]
        == (doc["metadata"]["annotations"][names.SNAPSHOT_URI])
    )


def test_the_pods_report_demand_to_the_manifests_redis_unless_told_otherwise(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer
) -> None:
    def env(*flags: str) -> dict[str, str]:
        run = deploy(kold, model, "--dry-run", "-o", "json", *flags)
        assert run.rc == 0, run.err
        (container,) = json.loads(run.out)["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e["value"] for e in container["env"]}

    assert env()["KOLD_REDIS_URL"] == "redis://kold-redis:6379/0"
    assert env("--redis-url", "redis://redis.ops:6379/2")["KOLD_REDIS_URL"] == "redis://redis.ops:6379/2"
    assert "KOLD_REDIS_URL" not in env("--redis-url", "")
    assert apiserver.requests == []


def test_a_redis_password_is_refused_before_anything_and_never_printed(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, s3_server: LocalS3Server
) -> None:
    for flags in ([], ["--dry-run"]):
        run = deploy(kold, model, "--redis-url", "redis://:hunter2-pw@redis.ops:6379/0", *flags)
        assert run.rc == 1
        assert run.error.startswith("kold: error: --redis-url carries a password")
        assert "KOLD_REDIS_URL in the namespace's kold-s3 Secret" in run.error and "--redis-url ''" in run.error
        assert "hunter2-pw" not in run.err + run.out
    assert apiserver.requests == []
    assert open_store(store, s3_server.options()).list_keys("snapshots") == []


def test_a_file_store_is_refused_for_a_cluster_but_not_for_a_dry_run(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOLD_STORE")
    run = deploy(kold, model)
    assert run.rc == 1 and "pods cannot read it" in run.error and "KOLD_STORE=s3://" in run.error
    assert "KOLD_S3_ENDPOINT" in run.error
    assert apiserver.requests == []
    dry = deploy(kold, model, "--dry-run")
    assert dry.rc == 0 and yaml.safe_load(dry.out)["kind"] == "Service"
    assert "pods could not read it" in dry.err


def test_the_store_and_the_cluster_are_checked_before_the_model_is_resolved(
    kold: Any, store: str, apiserver: FakeApiServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A Hub download or a GGUF's hash can take minutes: a refusal that needs neither comes first. A
    model that cannot be resolved shows which check ran first."""
    garbled = tmp_path / "garbled.gguf"
    garbled.write_bytes(b"not a gguf file at all")

    def run(*flags: str) -> Run:
        return kold("deploy", str(garbled), "--name", "tiny", "--target", "knative", *flags)

    apiserver.deny("get", "services")
    assert "cannot get services.serving.knative.dev" in run().error, "the cluster before the model"
    apiserver.allow("get", "services")
    monkeypatch.delenv("KOLD_STORE")
    assert "pods cannot read it" in run().error, "the store before the model"
    apiserver.clear_requests()
    dry = run("--dry-run")
    assert dry.rc == 1 and "garbled.gguf" in dry.error, "a dry run resolves the model ..."
    assert apiserver.requests == [], "... and contacts no cluster"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-instances", "5", "--max-instances", "2"], "--min-instances 5 is above --max-instances 2"),
        (["--idle-timeout", "7200"], "at most 1h"),
        (["--device", "cuda:1"], "cpu or cuda"),
        (["--prewarm", "psychic"], "--prewarm: unknown prewarm policy"),
    ],
)
def test_flags_knative_would_refuse_fail_before_anything_is_published(
    kold: Any,
    model: Path,
    store: str,
    apiserver: FakeApiServer,
    s3_server: LocalS3Server,
    flags: list[str],
    message: str,
) -> None:
    run = deploy(kold, model, *flags)
    assert run.rc == 1 and message in run.error
    assert apiserver.requests == []
    assert open_store(store, s3_server.options()).list_keys("snapshots") == []


def test_namespace_from_the_setting_and_the_flag_over_it(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOLD_KNATIVE_NAMESPACE", "from-env")
    assert deploy(kold, model).rc == 0
    assert apiserver.get_object("services", "from-env", "tiny") is not None
    assert deploy(kold, model, "--namespace", "from-flag").rc == 0
    assert apiserver.get_object("services", "from-flag", "tiny") is not None
    assert apiserver.get_object("services", NAMESPACE, "tiny") is None


def test_ls_describe_and_rm(kold: Any, model: Path, store: str, apiserver: FakeApiServer, knative: KnativeSim) -> None:
    assert kold("ls", "--target", "knative").rc == 0
    assert deploy(kold, model, "--min-instances", "1", "--idle-timeout", "300").rc == 0

    listed = kold("ls", "--target", "knative")
    assert listed.rc == 0, listed.err
    header, row = listed.out.splitlines()
    assert header.split() == ["NAME", "STATE", "SERVING", "SCALE", "URL"]
    assert row.split() == ["tiny", "ready", "tiny-00001", "1-4", f"http://tiny.{NAMESPACE}.example.com"]
    as_json = json.loads(kold("ls", "--target", "knative", "-o", "json").out)
    assert as_json["namespace"] == NAMESPACE and as_json["functions"][0]["serving"] == "tiny-00001"

    # the controller holds a floor on the serving revision
    floor = {"instances": 2, "until": 4102444800.0, "reason": "forecast: rate rising"}
    revision = apiserver.get_object("revisions", NAMESPACE, "tiny-00001")
    assert revision is not None
    revision["metadata"]["annotations"] |= {names.FLOOR: json.dumps(floor), names.MIN_SCALE: "2"}
    apiserver.put_object(revision, "revisions")
    knative.set_replicas("tiny-00001", 2, NAMESPACE)

    described = kold("describe", "tiny", "--target", "knative")
    assert described.rc == 0, described.err
    text = described.out
    assert f"URL:        http://tiny.{NAMESPACE}.example.com" in text
    assert f"OpenAI:     base_url=http://tiny.{NAMESPACE}.example.com/v1, model=tiny" in text
    assert "Revisions:  latest created tiny-00001, latest ready tiny-00001" in text
    assert "min 1, max 4, target 4 in flight per pod, scale-down delay 300 s" in text
    assert "Pre-warm:   forecast (the default)" in text
    assert "Floor:      2 instances until 2100-01-01" in text and "(forecast: rate rising)" in text
    assert "Snapshot:   " + store in text
    conditions = text[text.index("Conditions:") :]
    assert "Ready" in conditions and "True" in conditions
    rev_row = next(line for line in text.splitlines() if line.strip().startswith("tiny-00001"))
    assert rev_row.split()[:5] == ["tiny-00001", "True", "100%", "2", "2"]
    assert "Owner:" not in text
    doc = json.loads(kold("describe", "tiny", "--target", "knative", "-o", "json").out)
    assert doc["deployed_by_kold"] is True
    assert doc["floor"] == floor and doc["scaling"]["idle_timeout_s"] == 300
    assert doc["revisions"][0]["actual_replicas"] == 2

    removed = kold("rm", "tiny", "--target", "knative")
    assert removed.rc == 0 and removed.out == f"function tiny removed from namespace {NAMESPACE}\n"
    assert apiserver.get_object("services", NAMESPACE, "tiny") is None
    again = kold("rm", "tiny", "--target", "knative")
    assert again.rc == 1 and again.error == f"kold: error: no function tiny in namespace {NAMESPACE}"
    absent = kold("describe", "tiny", "--target", "knative")
    assert absent.rc == 1 and absent.error == f"kold: error: no function tiny in namespace {NAMESPACE}"


def foreign_service(apiserver: FakeApiServer) -> dict[str, Any]:
    """A Knative Service named like the function that someone else deployed (no kold label)."""
    return apiserver.put_object(
        {
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": {"name": "tiny", "namespace": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "web"}},
            "spec": {"template": {"spec": {"containers": [{"image": "registry.example/web:1"}]}}},
        }
    )


def test_rm_refuses_a_knative_service_kold_did_not_deploy(kold: Any, apiserver: FakeApiServer) -> None:
    before = foreign_service(apiserver)
    run = kold("rm", "tiny", "--target", "knative")
    assert run.rc == 1
    assert run.error == (
        f"kold: error: tiny in namespace {NAMESPACE} is a Knative Service kold did not deploy: not removing it "
        f"(kubectl delete ksvc tiny -n {NAMESPACE} if you mean it)"
    )
    assert apiserver.calls("DELETE", "services") == []
    assert apiserver.get_object("services", NAMESPACE, "tiny") == before


def test_deploy_refuses_to_take_over_a_knative_service_kold_did_not_deploy(
    kold: Any, model: Path, store: str, apiserver: FakeApiServer, s3_server: LocalS3Server
) -> None:
    before = foreign_service(apiserver)
    run = deploy(kold, model)
    assert run.rc == 1
    assert run.error.startswith(
        f"kold: error: tiny in namespace {NAMESPACE} is a Knative Service kold did not deploy: not replacing it"
    )
    assert [r.method for r in apiserver.requests if r.method != "GET"] == [], "nothing applied over it"
    assert apiserver.get_object("services", NAMESPACE, "tiny") == before
    assert open_store(store, s3_server.options()).list_keys("snapshots") == [], "refused before the upload"


def test_describe_shows_a_foreign_service_as_not_kolds(kold: Any, apiserver: FakeApiServer) -> None:
    foreign_service(apiserver)
    described = kold("describe", "tiny", "--target", "knative")
    assert described.rc == 0, described.err
    assert "Owner:      not kold's: a Knative Service kold did not deploy" in described.out
    assert json.loads(kold("describe", "tiny", "--target", "knative", "-o", "json").out)["deployed_by_kold"] is False


def test_the_local_target_refuses_cluster_flags(kold: Any, model: Path, store: str) -> None:
    run = kold("ls", "--namespace", "ml", cluster=False)
    assert (
        run.rc == 1
        and run.error == "kold: error: --namespace is for --target knative (the local platform has no namespace)"
    )


def test_the_installed_cli_finds_the_cluster_by_kubeconfig_or_says_how_to(
    apiserver: FakeApiServer, knative: KnativeSim, kubeconfig: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOLD_", "KUBERNETES_"))}
    env |= {"KOLD_HOME": str(tmp_path / "home"), "KUBECONFIG": str(kubeconfig)}
    listed = subprocess.run(
        [str(KOLD), "ls", "--target", "knative"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert listed.returncode == 0, listed.stderr
    assert f"no functions in namespace {NAMESPACE}" in listed.stderr
    env["KUBECONFIG"] = str(tmp_path / "absent")
    lost = subprocess.run(
        [str(KOLD), "ls", "--target", "knative"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert lost.returncode == 1
    assert lost.stderr.strip() == (
        f"kold: error: no cluster to talk to: no kubeconfig at {tmp_path / 'absent'} and not running in a pod; "
        "set KUBECONFIG (or pass --kubeconfig/--context) to point kold at a cluster"
    )
