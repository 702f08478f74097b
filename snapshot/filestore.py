"""`file://` store: a local directory, the embedded default.

Writes go to a temporary name in the same directory and are renamed into place when complete, so a
crash never leaves a half-written object under its real key. Reads use `os.preadv` straight into the
caller's buffer: the kernel copies from the page cache into the destination, nothing in between.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

from kold.snapshot.errors import ObjectNotFoundError, StoreError
from kold.snapshot.store import check_key, put_via_writer


class FileReader:
    def __init__(self, path: Path) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{path} does not exist") from None
        self._size = os.fstat(self._fd).st_size
        self.path = path

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        return self._fd

    def read_into(self, offset: int, dest: memoryview) -> int:
        done = 0
        total = len(dest)
        while done < total:
            try:
                n = os.preadv(self._fd, [dest[done:]], offset + done)
            except InterruptedError:
                continue
            if n == 0:
                break  # end of file: the caller decides whether that is a truncation
            done += n
        return done

    def close(self) -> None:
        """Idempotent: a second close must not hit a descriptor number another thread has reopened."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class FileWriter:
    """Streams into `<key>.tmp-<uuid>`; `commit` fsyncs and renames it to the key."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._final = path
        self._tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit/abort

    def write(self, data: memoryview | bytes) -> None:
        self._file.write(data)

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._final)

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri}/{key} does not exist") from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri}/{key} does not exist") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        put_via_writer(self.open_writer(key), data)

    def open_reader(self, key: str) -> FileReader:
        return FileReader(self.path(key))

    def open_writer(self, key: str) -> FileWriter:
        try:
            return FileWriter(self.path(key))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS, errno.ENOSPC):
                raise StoreError(f"cannot write {self.uri}/{key}: {exc.strerror}") from None
            raise

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / check_key(prefix) if prefix else self.root
        if not base.exists():
            return []
        keys = []
        for path in base.rglob("*") if base.is_dir() else [base]:
            if path.is_file() and ".tmp-" not in path.name:
                keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        target = self.root / check_key(prefix)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
