"""Where the platform that `kold up` started is: the state every client command reads, as kubectl reads its context.

`kold up` writes `$KOLD_HOME/platform.json` (pid, URL, start time, Redis URL, log file) when it
starts and removes it when it stops. `kold deploy|ls|describe|invoke|logs|keys|...` find the
gateway from it, and `kold down` the process to stop. A state whose process is gone (killed,
the machine rebooted, the pid reused by another program) counts as no platform.

Where a client command sends its requests, first match wins: `--url`, then `KOLD_GATEWAY_URL`,
then this state, then http://127.0.0.1:8080 (`kold up`'s default port).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "platform.json"
DEFAULT_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class PlatformState:
    pid: int
    url: str  # where clients reach the gateway (a wildcard bind address is written as loopback)
    started_at: float  # Unix time
    redis_url: str | None = None
    log_path: str | None = None  # `kold up --detach`'s output; None in the foreground (it is the terminal)
    # the process's start time in clock ticks after boot (Linux): a pid reused by another program
    # has another one, so `kold down` never signals a stranger
    pid_start: int | None = None


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def process_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (starttime); None where there is no /proc or no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')': split after the last ')'
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_alive(state: PlatformState) -> bool:
    """Whether the process the state names still runs, and is the same process."""
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user: not ours, whatever the file says
        return False
    return state.pid_start is None or process_start(state.pid) in (None, state.pid_start)


def write_state(home: Path, state: PlatformState) -> None:
    """Replace the state file atomically: a client reading it at the same moment sees the old or the new one."""
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=home, prefix=f".{STATE_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(state), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, state_path(home))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_state(home: Path) -> PlatformState | None:
    """The running platform's state; None when there is none, it is unreadable, or its process is gone."""
    try:
        doc = json.loads(state_path(home).read_text())
        state = PlatformState(
            pid=int(doc["pid"]),
            url=str(doc["url"]),
            started_at=float(doc["started_at"]),
            redis_url=_optional_str(doc.get("redis_url")),
            log_path=_optional_str(doc.get("log_path")),
            pid_start=None if doc.get("pid_start") is None else int(doc["pid_start"]),
        )
    except (OSError, ValueError, KeyError, TypeError):  # missing, half-written by hand, another format
        return None
    return state if state.pid > 0 and is_alive(state) else None


def remove_state(home: Path, pid: int) -> None:
    """Remove the state file if it still names `pid`: a platform that ends never removes a newer one's."""
    path = state_path(home)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(doc, dict) and doc.get("pid") == pid:
        path.unlink(missing_ok=True)


def clear_stale_state(home: Path) -> None:
    """Remove a state file whose process is gone (it was killed before it could remove it)."""
    try:
        pid = json.loads(state_path(home).read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if read_state(home) is None and isinstance(pid, int):
        remove_state(home, pid)


@dataclass(frozen=True)
class GatewayLocation:
    """The URL a client command uses, and where it came from (error messages say so)."""

    url: str
    source: str  # "--url", "KOLD_GATEWAY_URL", "state" or "default"
    state: PlatformState | None = None

    def unreachable(self, home: Path) -> str:
        """The one-line error when nothing answers at the URL, with what to do about it."""
        where = f"no kold platform answers at {self.url}"
        if self.source == "state" and self.state is not None:
            log = f"; its log: {self.state.log_path}" if self.state.log_path else ""
            return f"{where}, where the platform `kold up` started (pid {self.state.pid}) listens: is it still starting?{log}"
        if self.source == "default":
            return (
                f"{where} (the default: no `kold up` is running with KOLD_HOME={home}): "
                "start it with `kold up`, or name the gateway with --url or KOLD_GATEWAY_URL"
            )
        if self.source == "KOLD_GATEWAY_URL":
            return f"{where} (from KOLD_GATEWAY_URL, which overrides the platform `kold up` started): start it with `kold up`"
        return f"{where} (from --url): start it with `kold up`, or check the URL"


def locate_gateway(flag_url: str | None, env_url: str | None, home: Path) -> GatewayLocation:
    """Where client commands send their requests: --url, KOLD_GATEWAY_URL, `kold up`'s state, the default."""
    if flag_url:
        return GatewayLocation(flag_url.rstrip("/"), "--url")
    if env_url:
        return GatewayLocation(env_url.rstrip("/"), "KOLD_GATEWAY_URL")
    state = read_state(home)
    if state is not None:
        return GatewayLocation(state.url.rstrip("/"), "state", state)
    return GatewayLocation(DEFAULT_URL, "default")


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)
