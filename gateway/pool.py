"""The instance manager: `kold runtime serve` processes on free loopback ports.

Each instance is one runtime process of one revision. By default it is forked from the pool's fork
template (fork_template.py: one process that has imported torch and the runtime already, so an
instance skips ~2 s of imports); with `start_method="spawn"`, or while the template cannot start or
has died (until a new one is tried), it is a fresh `python -m kold runtime serve ...` subprocess.
Both go through one small process handle (`InstanceProcess`), so everything below is the same for
either. Its stdout and stderr are appended to
`<log_dir>/<instance id>.log` (what `kold logs` shows). A process that exits while it was not being
stopped is noticed at once (a waiter task per process): its state becomes FAILED and the pool's
`on_failure(instance)` callback runs, so the router can retry and replace it. A runtime that could
not bind its port (another process took it between our probe and its bind) is respawned on another
port, transparently, a few times.

Stopping is Knative's scale-in: SIGTERM, on which the runtime refuses new requests, finishes the
in-flight ones and exits 0; SIGKILL if it has not exited within the drain timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from kold.gateway.fork_template import ForkTemplate, TemplateError

log = logging.getLogger("kold.gateway.pool")

_ID = re.compile(r"^[a-z0-9-]+$")
_BIND_RETRIES = 3
_BIND_FAILURE = "address already in use"
_POLL_S = 0.02
_TEMPLATE_LOG = "fork-template.log"  # in log_dir; no instance's (an instance id ends in its number)
TEMPLATE_RETRY_S = 10.0  # after the template's first failure, spawn this long before trying a new one
TEMPLATE_RETRY_MAX_S = 600.0
# Stopped and failed instances kept per revision, newest first, for `kold describe` and the logs; older
# ones are forgotten as new ones start, so a long churn of instances cannot grow the pool without end.
FINISHED_KEPT_PER_REVISION = 16

StartMethod = Literal["fork-template", "spawn"]


class InstanceProcess(Protocol):
    """What the pool needs of an instance's process: asyncio's `Process` (spawned) has it, and so has
    `ForkedProcess` (forked from the template, which is its parent)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class RuntimeSpecLike(Protocol):
    """What the pool needs of a revision's runtime settings (registry.RuntimeSpec has them)."""

    @property
    def device(self) -> str: ...
    @property
    def max_batch(self) -> int: ...
    @property
    def max_seq_len(self) -> int | None: ...


class RevisionLike(Protocol):
    """What the pool needs of a revision (registry.Revision has it)."""

    @property
    def function(self) -> str: ...
    @property
    def revision_id(self) -> str: ...
    @property
    def snapshot_uri(self) -> str: ...
    @property
    def runtime(self) -> RuntimeSpecLike: ...


class InstanceState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(eq=False)
class Instance:
    id: str
    revision_id: str
    port: int
    url: str
    log_path: Path
    state: InstanceState = InstanceState.STARTING
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    in_flight: int = 0  # the router's count of requests it sent here and not yet finished
    # STARTING, but the runtime listens and is restoring: it queues requests and runs them behind
    # the restore (runtime/early.py), so the request that woke it need not wait for READY
    accepting: bool = False
    exit_code: int | None = None
    # why its process failed: the runtime's termination log ({"code", "error"}), else how it exited
    failure: dict[str, Any] | None = None
    cold_start: dict[str, Any] | None = None  # the breakdown the runtime's ready /readyz answer carries
    process: InstanceProcess | None = field(default=None, repr=False)
    start_method: StartMethod | None = None  # how its current process was started
    _args: list[str] = field(default_factory=list, repr=False)  # the `kold` CLI's, less --port
    _log_offset: int = field(default=0, repr=False)  # where this process's output begins in the log
    _bind_retries: int = field(default=0, repr=False)
    _waiter: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.state in (InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING)


def _cold_start(ready: httpx.Response) -> dict[str, Any] | None:
    """The cold-start breakdown in a runtime's ready /readyz answer (the object its "startup" log
    line holds); None when the answer carries none."""
    with contextlib.suppress(ValueError):
        body = ready.json()
        cold = body.get("cold_start") if isinstance(body, dict) else None
        if isinstance(cold, dict):
            return cold
    return None


def _check_id(value: str, what: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"{what} {value!r} must match {_ID.pattern}")
    return value


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class InstancePool:
    """Runtime processes of all revisions. `env` is the processes' whole environment (None: ours).

    `start_method`: "fork-template" (the default when `python` is this interpreter) forks instances
    from a template process started on the first `start` (or by `warm_template`); "spawn" (the
    default for another interpreter) runs each as a fresh subprocess. A template that cannot start,
    or dies, makes the pool spawn for a back-off period, then try a new template.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        on_failure: Callable[[Instance], Any] | None = None,
        start_method: StartMethod | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.python = python
        self.env = dict(env) if env is not None else None
        self.host = host
        self.on_failure = on_failure
        if start_method is None:
            same = os.path.abspath(python) == os.path.abspath(sys.executable)
            start_method = "fork-template" if same else "spawn"
        if start_method not in ("fork-template", "spawn"):
            raise ValueError(f"start_method {start_method!r}: 'fork-template' or 'spawn'")
        self.start_method: StartMethod = start_method
        self._template: ForkTemplate | None = None
        self._template_start: asyncio.Task[ForkTemplate | None] | None = None
        self._template_failures = 0
        self._template_retry_at: float | None = None  # after a failure: spawn until then
        self._template_closing: set[asyncio.Future[None]] = set()
        # the secret instances demand on their /v1/ routes (x-kold-instance-token): only the gateway has it
        self.instance_token = secrets.token_urlsafe(32)
        self._instances: dict[str, Instance] = {}
        self._by_revision: dict[str, dict[str, Instance]] = {}  # the same instances, by revision id
        self._numbers = itertools.count(1)
        self._http: httpx.AsyncClient | None = None

    # -- starting ----------------------------------------------------------------------------------

    async def start(self, revision: RevisionLike) -> Instance:
        """Start a runtime for `revision` (forked or spawned); returns at once, STARTING (see `wait_ready`)."""
        revision_id = _check_id(revision.revision_id, "revision id")
        while True:
            instance_id = _check_id(f"{revision_id}-{next(self._numbers)}", "instance id")
            if instance_id not in self._instances:
                break
        spec = revision.runtime
        args = [
            "runtime",
            "serve",
            "--snapshot",
            revision.snapshot_uri,
            "--host",
            self.host,
            "--max-batch",
            str(spec.max_batch),
            "--device",
            spec.device,
            # clients name the function, and responses should say so too
            "--served-model-name",
            revision.function,
        ]
        if spec.max_seq_len is not None:
            args += ["--max-seq-len", str(spec.max_seq_len)]
        args += ["--termination-log", str(self.log_dir / f"{instance_id}.termination")]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        inst = Instance(
            id=instance_id, revision_id=revision_id, port=0, url="", log_path=self.log_dir / f"{instance_id}.log"
        )
        inst._args = args
        self._forget_finished(revision_id, FINISHED_KEPT_PER_REVISION)
        self._register(inst)
        try:
            await self._launch(inst)
        except BaseException:
            inst.state = InstanceState.FAILED
            raise
        return inst

    def _instance_env(self) -> dict[str, str]:
        env = dict(self.env if self.env is not None else os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["KOLD_INSTANCE_TOKEN"] = self.instance_token
        env.pop("PORT", None)
        return env

    async def _launch(self, inst: Instance) -> None:
        """Start the instance's process on a fresh port: forked from the template, else spawned."""
        inst.port = _free_port(self.host)
        inst.url = f"http://{self.host}:{inst.port}"
        env = self._instance_env()
        argv = [*inst._args, "--port", str(inst.port)]
        template = await self._usable_template()
        process: InstanceProcess | None = None
        with open(inst.log_path, "ab") as out:
            inst._log_offset = out.tell()
            out.write(f"--- kold: instance {inst.id} starting on port {inst.port}\n".encode())
            out.flush()
            if template is not None:
                try:
                    process = await template.fork(argv, env, out.fileno())
                    inst.start_method = "fork-template"
                except TemplateError as exc:
                    self._template_unusable(str(exc), template)
            if process is None:
                process = await asyncio.create_subprocess_exec(
                    self.python,
                    "-m",
                    "kold",
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # a Ctrl-C at the gateway's terminal is the gateway's to handle
                )
                inst.start_method = "spawn"
        inst.process = process
        log.info("instance %s: pid %s on port %s (%s)", inst.id, process.pid, inst.port, inst.start_method)
        inst._waiter = asyncio.create_task(self._wait_exit(inst, process), name=f"kold-wait-{inst.id}")

    # -- the fork template -------------------------------------------------------------------------

    async def warm_template(self) -> bool:
        """Start the fork template now rather than on the first instance; whether it is usable."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return await self._usable_template() is not None

    async def _usable_template(self) -> ForkTemplate | None:
        """The running template (started on first use, by one task however many wait), or None: spawn.

        After a failure, instances are spawned until `_template_retry_at`; the next instance after that
        starts a new template (waiting for its imports, as the very first one did)."""
        if self.start_method != "fork-template":
            return None
        if self._template_start is None:
            if self._template_retry_at is not None and time.monotonic() < self._template_retry_at:
                return None
            self._template_start = asyncio.create_task(self._start_template(), name="kold-template-start")
        template = await asyncio.shield(self._template_start)
        if template is not None and not template.alive:
            self._template_unusable("it is not running", template)
            return None
        return template

    async def _start_template(self) -> ForkTemplate | None:
        template = ForkTemplate(
            self.python,
            self._instance_env(),
            str(self.log_dir / _TEMPLATE_LOG),
            on_exit=lambda code: self._template_unusable(f"it exited with {code}", template),
        )
        self._template = template
        try:
            await template.start()
        except Exception as exc:  # whatever went wrong, spawning still works
            self._template_unusable(str(exc), template)
            return None
        if self._template_failures:
            log.warning("fork template: restarted (pid %s); instances are forked again", template.pid)
        log.info("fork template: pid %s, imports done in %ss", template.pid, template.info.get("preload_s"))
        return template

    def _template_unusable(self, reason: str, template: ForkTemplate) -> None:
        """Spawn for a while (backing off: TEMPLATE_RETRY_S, doubling, at most TEMPLATE_RETRY_MAX_S),
        then try a new template: a gateway that runs for weeks should not lose fast starts for good
        because its template was OOM-killed once."""
        if template is not self._template:
            return  # an old template, already replaced
        self._template_failures += 1
        delay = min(TEMPLATE_RETRY_MAX_S, TEMPLATE_RETRY_S * 2 ** (self._template_failures - 1))
        self._template_retry_at = time.monotonic() + delay
        log.warning(
            "fork template unusable (%s): instances are spawned for the next %.0f s, then a new template is tried",
            reason,
            delay,
        )
        self._template, self._template_start = None, None
        closing = asyncio.ensure_future(template.close())  # harmless if it is gone already
        self._template_closing.add(closing)
        closing.add_done_callback(self._template_closing.discard)

    async def _wait_exit(self, inst: Instance, process: InstanceProcess) -> None:
        code = await process.wait()
        if process is not inst.process:
            return
        inst.exit_code = code
        if inst.state in (InstanceState.DRAINING, InstanceState.STOPPED):
            return
        if (
            inst.state is InstanceState.STARTING
            and inst._bind_retries < _BIND_RETRIES
            and _BIND_FAILURE in self._own_output(inst).lower()
        ):
            inst._bind_retries += 1
            log.warning("instance %s: port %s was taken, retrying on another", inst.id, inst.port)
            inst.exit_code = None
            try:
                await self._launch(inst)
                return
            except Exception:
                log.exception("instance %s: respawn failed", inst.id)
        inst.state = InstanceState.FAILED
        inst.failure = self._termination(inst) or {"code": "exited", "error": f"the instance exited with status {code}"}
        log.warning("instance %s exited unexpectedly with %s (%s)", inst.id, code, inst.failure["error"])
        if self.on_failure is not None:
            try:
                result = self.on_failure(inst)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("on_failure(%s) raised", inst.id)

    async def wait_ready(
        self, inst: Instance, timeout_s: float, on_accepting: Callable[[Instance], None] | None = None
    ) -> bool:
        """Poll /readyz until 200 (READY: True), the process exits (FAILED: False) or the timeout (False).

        The first "restoring" answer marks the instance `accepting` and calls `on_accepting`."""
        deadline = time.monotonic() + timeout_s
        http = self._client()
        while True:
            if inst.state is InstanceState.READY:
                return True
            if inst.state is not InstanceState.STARTING:
                return False
            process = inst.process
            if process is not None and process.returncode is not None:
                # the waiter task decides (FAILED, or a respawn after a bind failure)
                await asyncio.sleep(_POLL_S)
            else:
                with contextlib.suppress(httpx.HTTPError):
                    r = await http.get(f"{inst.url}/readyz", timeout=max(0.05, min(1.0, deadline - time.monotonic())))
                    if r.status_code != 200 and not inst.accepting and process is inst.process:
                        with contextlib.suppress(ValueError, AttributeError):  # not the runtime's JSON
                            if r.json().get("state") == "restoring":
                                inst.accepting = True
                                if on_accepting is not None:
                                    on_accepting(inst)
                    if r.status_code == 200 and inst.state is InstanceState.STARTING and process is inst.process:
                        inst.state = InstanceState.READY
                        inst.ready_at = time.time()
                        inst.cold_start = _cold_start(r)
                        if inst.cold_start is not None:  # the runtime cannot know how it was started
                            inst.cold_start["start_method"] = inst.start_method
                        return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)

    # -- stopping ----------------------------------------------------------------------------------

    async def stop(self, inst: Instance, drain_timeout_s: float = 30.0) -> None:
        """Drain and stop: SIGTERM (the runtime finishes in-flight requests), SIGKILL after the timeout."""
        process = inst.process
        if process is None or process.returncode is not None:
            if inst.state is not InstanceState.FAILED:
                inst.state = InstanceState.STOPPED
            if process is not None:
                inst.exit_code = process.returncode
            return
        if inst.state is not InstanceState.FAILED:
            inst.state = InstanceState.DRAINING
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), drain_timeout_s)
        except TimeoutError:
            log.warning("instance %s did not drain within %ss: killing it", inst.id, drain_timeout_s)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        inst.exit_code = process.returncode
        if inst.state is not InstanceState.FAILED:
            inst.state = InstanceState.STOPPED
        if inst._waiter is not None:
            await asyncio.gather(inst._waiter, return_exceptions=True)

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop every instance (`kold down`), then the fork template."""
        live = [i for i in self._instances.values() if i.process is not None and i.process.returncode is None]
        await asyncio.gather(*(self.stop(i, drain_timeout_s) for i in live), return_exceptions=True)
        waiters = [i._waiter for i in self._instances.values() if i._waiter is not None]
        await asyncio.gather(*waiters, return_exceptions=True)
        if self._template_start is not None and not self._template_start.done():
            self._template_start.cancel()
            await asyncio.gather(self._template_start, return_exceptions=True)
        if self._template is not None:
            await self._template.close()
        await asyncio.gather(*self._template_closing, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- looking -----------------------------------------------------------------------------------

    def instances(self, revision_id: str | None = None) -> list[Instance]:
        """The instances the pool started, oldest first: the live ones and the last stopped or failed
        ones (FINISHED_KEPT_PER_REVISION per revision)."""
        if revision_id is None:
            return list(self._instances.values())
        return list(self._by_revision.get(revision_id, {}).values())

    def _register(self, inst: Instance) -> None:
        self._instances[inst.id] = inst
        self._by_revision.setdefault(inst.revision_id, {})[inst.id] = inst

    def forget_revision(self, revision_id: str) -> None:
        """Drop the revision's stopped and failed instances (its function was removed)."""
        self._forget_finished(revision_id, 0)

    def _forget_finished(self, revision_id: str, keep: int) -> None:
        """Forget all but the newest `keep` finished instances of the revision whose exit was handled."""
        of_rev = self._by_revision.get(revision_id, {})
        finished = [
            i
            for i in of_rev.values()
            if not i.alive and (i.process is None or i.process.returncode is not None)
            and (i._waiter is None or i._waiter.done())
        ]  # fmt: skip
        for inst in finished[: max(0, len(finished) - keep)]:
            del self._instances[inst.id]
            del of_rev[inst.id]
        if not of_rev:
            self._by_revision.pop(revision_id, None)

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def read_log(self, inst: Instance, tail_lines: int | None = None) -> str:
        """The instance's captured output (all its processes), or its last `tail_lines` lines."""
        path = self.log_dir / f"{_check_id(inst.id, 'instance id')}.log"
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                if tail_lines is None:
                    return f.read()
                return "".join(deque(f, maxlen=max(0, tail_lines)))
        except FileNotFoundError:
            return ""

    def _termination(self, inst: Instance) -> dict[str, Any] | None:
        """The cause the instance's runtime wrote before it exited, if it wrote one."""
        path = self.log_dir / f"{inst.id}.termination"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and isinstance(data.get("code"), str) and isinstance(data.get("error"), str):
            return {"code": data["code"], "error": data["error"]}
        return None

    @property
    def instance_headers(self) -> dict[str, str]:
        """What a request straight to an instance must carry (the router sends it on every request)."""
        return {"x-kold-instance-token": self.instance_token}

    def _own_output(self, inst: Instance) -> str:
        """The output of the instance's current process."""
        try:
            with open(inst.log_path, "rb") as f:
                f.seek(inst._log_offset)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(trust_env=False)
        return self._http
