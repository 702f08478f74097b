"""`kold up` on an address beyond loopback demands keys from the start, and makes the first one: an
admin key whose secret it leaves in $KOLD_HOME/admin.key (mode 600), where the CLI on this machine
finds it. Without it, nobody could have created a key."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest
from kold_up import kold, platform_env

pytestmark = pytest.mark.timeout(300)


def test_kold_up_beyond_loopback_creates_the_first_admin_key(tmp_path: Path) -> None:
    env = platform_env(tmp_path)
    port = env["KOLD_TEST_PORT"]
    up = kold("up", "--detach", "--host", "0.0.0.0", "--port", port, env=env, timeout=90)
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        key_file = Path(env["KOLD_HOME"]) / "admin.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        secret = key_file.read_text().strip()
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models", trust_env=False).status_code == 401  # keys demanded at once
        ok = httpx.get(f"{url}/admin/functions", headers={"Authorization": f"Bearer {secret}"}, trust_env=False)
        assert ok.status_code == 200  # an admin key
        listed = kold("keys", "ls", env=env)  # the CLI here finds the key by itself
        assert listed.returncode == 0 and "kold up (bootstrap)" in listed.stdout, listed.stderr
    finally:
        assert kold("down", env=env, timeout=90).returncode == 0
    # a second start finds the key it made and makes no other
    up = kold("up", "--detach", "--host", "0.0.0.0", "--port", port, env=env, timeout=90)
    assert up.returncode == 0, up.stderr + up.stdout
    try:
        keys = kold("keys", "ls", "-o", "json", env=env)
        assert keys.returncode == 0, keys.stderr
        assert '"kold up (bootstrap)"' in keys.stdout and keys.stdout.count('"key_id"') == 1
    finally:
        kold("down", env=env, timeout=90)
