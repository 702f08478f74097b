"""`s3://bucket/prefix` store: any S3-compatible service (AWS S3, MinIO, rclone serve s3, ...).

Imported only for s3:// URIs (see `open_store`), so the `file://` path never pays for boto3.

Why it looks the way it does:

* Ranged reads stream the HTTP body straight into the caller's buffer. urllib3 2.x's own `readinto`
  reads into a temporary `bytes` and copies it (two copies per byte, plus the garbage), so when the
  response is a plain, length-delimited, unencoded body we read through the `http.client` response
  underneath it: the socket's `recv_into` fills the destination, nothing in between. Any other
  response falls back to botocore's `StreamingBody.readinto`, which is correct, only slower.
* botocore retries a request until it has a response (5xx, throttling, resets while connecting),
  but not a body that breaks while it streams: that is the common failure of a multi-GB restore.
  `read_into` retries those itself, with exponential backoff and jitter, and resumes the range
  from the first byte it did not get.
* Uploads are multipart and streamed: parts are uploaded concurrently while the caller keeps
  writing, with a bounded number in flight, so memory stays at about (in flight + 1) x part size
  whatever the object size. Nothing is visible under the key until `commit` completes the upload.
* Every botocore failure leaves this module as one of the snapshot engine's own errors
  (`ObjectNotFoundError`, `StoreAuthError`, `StoreError`), naming the object and the error code.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn, cast

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from kold.snapshot.errors import ObjectNotFoundError, StoreAuthError, StoreError
from kold.snapshot.store import S3Options, check_key, default_io_threads, put_via_writer

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, ObjectIdentifierTypeDef

log = logging.getLogger(__name__)

MiB = 1 << 20
# S3 refuses parts under 5 MiB (all but the last) and uploads of more than 10,000 parts.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
# 32 MiB parts: large enough that per-request overhead is noise, small enough that 8 in flight
# stay well under the memory of a restore worker; 10,000 of them still allow 320 GiB objects.
DEFAULT_PART_SIZE = 32 * MiB
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys a call

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
_AUTH_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
    }
)

# Failures while a response body streams: botocore has already returned, so nobody else retries.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionResetError, TimeoutError (socket read timeout), ssl.SSLError, ...
    http.client.HTTPException,  # IncompleteRead from the direct http.client path
    urllib3.exceptions.HTTPError,  # ProtocolError, ReadTimeoutError raised by urllib3
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    ConnectionClosedError,
)


def _backoff(attempt: int, base: float, cap: float = 10.0) -> float:
    """Full-jitter exponential backoff: spreads the retries of many reader threads apart."""
    return random.uniform(0, min(cap, base * (2 ** (attempt - 1))))


def _parse_content_range_start(value: str | None) -> int | None:
    """First byte of a `Content-Range: bytes a-b/total` header, or None when absent or odd."""
    if not value:
        return None
    unit, _, rest = value.strip().partition(" ")
    first, dash, _ = rest.partition("-")
    if unit != "bytes" or not dash or not first.isdigit():
        return None
    return int(first)


def _direct_fp(body: Any) -> http.client.HTTPResponse | None:
    """The `http.client` response under botocore's StreamingBody, when reading it directly is safe.

    Safe means: urllib3 has not consumed anything yet, and the body is neither chunked nor
    content-encoded, so the bytes on the wire are the object's bytes and `readinto` lands them in
    the destination with no copy. Anything unexpected returns None (the slower, generic path).
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if not isinstance(fp, http.client.HTTPResponse) or getattr(raw, "chunked", True):
        return None
    if getattr(raw, "_fp_bytes_read", 1) != 0:
        return None
    headers = getattr(raw, "headers", None)
    encoding = headers.get("content-encoding", "") if headers is not None else ""
    if encoding.lower() not in ("", "identity"):
        return None
    return fp


def _finish_body(body: Any, consumed: bool) -> None:
    """Give the connection back to the pool when the body was read to its end, else drop it.

    A half-read connection cannot carry another request, and draining it could mean reading
    gigabytes we do not want, so it is closed instead.
    """
    raw = getattr(body, "_raw_stream", None)
    with contextlib.suppress(Exception):
        if consumed and raw is not None and hasattr(raw, "release_conn"):
            raw.release_conn()
        else:
            body.close()


class S3Reader:
    """Random access to one object: each `read_into` is one ranged GET, safe from many threads."""

    def __init__(self, store: S3Store, key: str, size: int) -> None:
        self._store = store
        self._key = key
        self._full_key = store.full_key(key)
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, dest: memoryview) -> int:
        if offset < 0:
            raise ValueError(f"negative offset {offset} reading {self._store.where(self._key)}")
        view = dest if dest.format == "B" and dest.ndim == 1 else dest.cast("B")
        # The object is immutable and its size known, so never ask for bytes past its end (S3
        # answers 416 to a range that starts there): a short count is the caller's to judge.
        want = max(0, min(len(view), self._size - offset))
        if want == 0:
            return 0
        view = view[:want]
        store = self._store
        done = 0
        attempt = 1
        while done < want:
            start = offset + done
            with store.errors("GET", self._key):
                resp = store.client.get_object(
                    Bucket=store.bucket, Key=self._full_key, Range=f"bytes={start}-{offset + want - 1}"
                )
            body = resp["Body"]
            got_start = _parse_content_range_start(resp.get("ContentRange"))
            if (got_start is None and start != 0) or (got_start is not None and got_start != start):
                _finish_body(body, consumed=False)
                raise StoreError(
                    f"GET {store.where(self._key)} asked for bytes from {start} but the server "
                    f"answered Content-Range {resp.get('ContentRange')!r}: it does not honour Range"
                )
            before = done
            consumed = False
            try:
                fp = _direct_fp(body)
                # botocore's StreamingBody.readinto takes any writable buffer (its stub says IO).
                stream: Any = fp if fp is not None else body
                while done < want:
                    n = stream.readinto(view[done:])
                    if not n:
                        # The server's Content-Length was met before `want`: the object is shorter
                        # than HEAD said (replaced under us). Report what there is.
                        consumed = True
                        return done
                    done += n
                # Pool the connection again only if its body is spent: a server that ignored the
                # range for offset 0 sent the whole object, and the rest must not meet the next GET.
                consumed = done - before == resp.get("ContentLength", -1)
            except _STREAM_ERRORS as exc:
                if attempt >= store.options.max_attempts:
                    raise StoreError(
                        f"GET {store.where(self._key)} bytes {start}-{offset + want - 1} failed "
                        f"{attempt} times while streaming; last error: {type(exc).__name__}: {exc}"
                    ) from None
                log.warning(
                    "GET %s broke after %d bytes (%s: %s); attempt %d/%d resumes from byte %d",
                    store.where(self._key),
                    done - before,
                    type(exc).__name__,
                    exc,
                    attempt + 1,
                    store.options.max_attempts,
                    offset + done,
                )
                attempt += 1
                time.sleep(_backoff(attempt - 1, store.backoff_base))
            finally:
                _finish_body(body, consumed)
        return done

    def close(self) -> None:
        """Nothing to release: connections belong to the store's pool, not to a reader."""


class S3Writer:
    """A streaming multipart upload of one object, with a bounded number of parts in flight.

    `write` copies into a part buffer; a full buffer is handed to the upload pool only when more
    data arrives, so the last part is never empty and an object that fits in one part is a single
    PutObject at `commit` (no multipart round trips for manifests and config files).
    """

    def __init__(self, store: S3Store, key: str, part_size: int, max_concurrency: int) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part size {part_size} is below S3's minimum of {MIN_PART_SIZE} bytes")
        self._store = store
        self._key = key
        self._full_key = store.full_key(key)
        self._part_size = part_size
        self._max_concurrency = max(1, max_concurrency)
        self._buf: bytearray | None = None
        self._fill = 0
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[str]] = []
        # In-flight parts are bounded: `write` blocks here, which is the backpressure that keeps
        # memory at (in flight + 1) x part size instead of the object size.
        self._slots = threading.BoundedSemaphore(self._max_concurrency)
        self._error: BaseException | None = None
        self._state = "open"  # open -> committed | aborted

    @property
    def part_size(self) -> int:
        return self._part_size

    def write(self, data: memoryview | bytes) -> None:
        self._check_open()
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        pos = 0
        total = len(src)
        while pos < total:
            if self._buf is None:
                self._buf = bytearray(self._part_size)
                self._fill = 0
            if self._fill == self._part_size:
                self._submit(self._buf)
                self._buf = bytearray(self._part_size)
                self._fill = 0
            n = min(total - pos, self._part_size - self._fill)
            self._buf[self._fill : self._fill + n] = src[pos : pos + n]
            self._fill += n
            pos += n

    def commit(self) -> None:
        self._check_open()
        store = self._store
        buf = self._buf if self._buf is not None else bytearray()
        del buf[self._fill :]  # in place: the bytearray is ours alone, no copy
        self._buf = None
        try:
            if self._upload_id is None:
                with store.errors("PUT", self._key):
                    store.client.put_object(Bucket=store.bucket, Key=self._full_key, Body=cast(bytes, buf))
            else:
                if buf:
                    self._submit(buf)
                parts: list[CompletedPartTypeDef] = [
                    {"PartNumber": i + 1, "ETag": fut.result()} for i, fut in enumerate(self._futures)
                ]
                with store.errors("CompleteMultipartUpload", self._key):
                    store.client.complete_multipart_upload(
                        Bucket=store.bucket,
                        Key=self._full_key,
                        UploadId=self._upload_id,
                        MultipartUpload={"Parts": parts},
                    )
        except BaseException:
            self._abort_upload()
            raise
        self._state = "committed"
        self._shutdown_pool()

    def abort(self) -> None:
        """Drop the upload. Best effort and quiet: it usually runs while another error unwinds."""
        if self._state != "open":
            return
        self._abort_upload()

    def _abort_upload(self) -> None:
        self._state = "aborted"
        self._buf = None
        for fut in self._futures:
            fut.cancel()
        # Wait for parts already on the wire: S3 may otherwise keep a part that lands after the
        # abort, and the upload would linger (and bill) until a lifecycle rule removes it.
        self._shutdown_pool()
        if self._upload_id is None:
            return
        try:
            with self._store.errors("AbortMultipartUpload", self._key):
                self._store.client.abort_multipart_upload(
                    Bucket=self._store.bucket, Key=self._full_key, UploadId=self._upload_id
                )
        except (ObjectNotFoundError, StoreError) as exc:
            log.warning("could not abort the multipart upload of %s: %s", self._store.where(self._key), exc)

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _check_open(self) -> None:
        if self._error is not None:
            self._fail()
        if self._state != "open":
            raise StoreError(f"upload of {self._store.where(self._key)} is already {self._state}")

    def _fail(self) -> NoReturn:
        """A part failed: drop the whole upload now (callers may forget `abort`) and re-raise."""
        assert self._error is not None
        if self._state == "open":
            self._abort_upload()
        raise self._error

    def _submit(self, buf: bytearray) -> None:
        store = self._store
        if self._upload_id is None:
            with store.errors("CreateMultipartUpload", self._key):
                resp = store.client.create_multipart_upload(Bucket=store.bucket, Key=self._full_key)
            self._upload_id = resp["UploadId"]
            self._pool = ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="kold-s3-upload")
        part_number = len(self._futures) + 1
        if part_number > MAX_PARTS:
            raise StoreError(
                f"{store.where(self._key)} needs more than {MAX_PARTS} parts of {self._part_size} "
                "bytes: use a larger part size"
            )
        self._slots.acquire()
        if self._error is not None:  # a part failed while we waited: stop feeding a dead upload
            self._slots.release()
            self._fail()
        assert self._pool is not None
        try:
            fut = self._pool.submit(self._upload_part, part_number, buf)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(fut)

    def _upload_part(self, part_number: int, buf: bytearray) -> str:
        store = self._store
        assert self._upload_id is not None
        try:
            with store.errors(f"UploadPart {part_number}", self._key):
                resp = store.client.upload_part(
                    Bucket=store.bucket,
                    Key=self._full_key,
                    UploadId=self._upload_id,
                    PartNumber=part_number,
                    # botocore sends bytearray as it is; the stubs only spell out bytes.
                    Body=cast(bytes, buf),
                )
            return resp["ETag"]
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            raise


class S3Store:
    """A bucket and key prefix on an S3-compatible service; keys are relative to the prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        options: S3Options | None = None,
        *,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part size {part_size} is below S3's minimum of {MIN_PART_SIZE} bytes")
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.options = options or S3Options()
        self.part_size = part_size
        self.backoff_base = 0.2  # seconds; tests shrink it
        self.list_page_size = 1000  # keys per ListObjectsV2 page (the S3 maximum); tests shrink it
        config = Config(
            # Restore threads and upload threads share the pool: too small a pool makes urllib3
            # open and discard connections ("Connection pool is full") on every request.
            max_pool_connections=max(self.options.max_concurrency, default_io_threads()) * 2,
            retries={"mode": "standard", "total_max_attempts": max(1, self.options.max_attempts)},
            connect_timeout=10,
            read_timeout=60,
            tcp_keepalive=True,
            # Path-style URLs (http://host/bucket/key): what MinIO, rclone and most self-hosted
            # services expect; virtual-hosted style needs wildcard DNS they rarely have.
            s3={"addressing_style": "path"} if self.options.endpoint_url else {},
            # Only send/check the flexible checksums when an operation requires them: many
            # S3-compatible services reject the aws-chunked trailers of the newer default, and
            # every chunk of a snapshot carries its own xxh3 checksum anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of our own: the default session is not thread-safe to create clients from.
        session = boto3.session.Session()
        self.client: S3Client = session.client(
            "s3",
            endpoint_url=self.options.endpoint_url,
            region_name=self.options.region,
            config=config,
        )

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def full_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def where(self, key: str | None) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    @contextlib.contextmanager
    def errors(self, op: str, key: str | None) -> Iterator[None]:
        """Translate botocore failures into the engine's errors, naming the object and the code."""
        try:
            yield
        except ClientError as exc:
            raise self._client_error(exc, op, key) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreAuthError(
                f"{op} {self.where(key)}: no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from None
        except BotoCoreError as exc:
            raise StoreError(
                f"{op} {self.where(key)} via {self.endpoint} failed after "
                f"{self.options.max_attempts} attempts: {type(exc).__name__}: {exc}"
            ) from None

    def _client_error(self, exc: ClientError, op: str, key: str | None) -> StoreError | ObjectNotFoundError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "?"
        message = str(error.get("Message", "")).strip()
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = self.where(key)
        if code == "NoSuchBucket":
            return ObjectNotFoundError(f"{where} does not exist: there is no bucket {self.bucket!r} at {self.endpoint}")
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFoundError(f"{where} does not exist")
        if code in _AUTH_CODES or status == 403:
            return StoreAuthError(
                f"{self.endpoint} refused the credentials for {op} {where} ({code}"
                + (f": {message}" if message and message != "Forbidden" else "")
                + "); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the key's permissions"
            )
        detail = f": {message}" if message else ""
        return StoreError(f"{op} {where} failed: {code} (HTTP {status}){detail}")

    def _head(self, key: str) -> int:
        with self.errors("HEAD", key):
            resp = self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
        return int(resp["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return self._head(key)

    def get_bytes(self, key: str) -> bytes:
        """One GET (no HEAD first: manifests are read on the cold-start path), retried if it breaks."""
        full_key = self.full_key(key)
        attempt = 1
        while True:
            with self.errors("GET", key):
                resp = self.client.get_object(Bucket=self.bucket, Key=full_key)
            body = resp["Body"]
            consumed = False
            try:
                data = body.read()  # StreamingBody checks the length against Content-Length
                consumed = True
                return data
            except _STREAM_ERRORS as exc:
                if attempt >= self.options.max_attempts:
                    raise StoreError(
                        f"GET {self.where(key)} failed {attempt} times while streaming; last error: "
                        f"{type(exc).__name__}: {exc}"
                    ) from None
                attempt += 1
                time.sleep(_backoff(attempt, self.backoff_base))
            finally:
                _finish_body(body, consumed)

    def put_bytes(self, key: str, data: bytes) -> None:
        put_via_writer(self.open_writer(key), data)

    def open_reader(self, key: str) -> S3Reader:
        return S3Reader(self, key, self._head(key))

    def open_writer(self, key: str, *, part_size: int | None = None) -> S3Writer:
        self.full_key(key)  # refuse a bad key now, not at the first part
        return S3Writer(self, key, part_size or self.part_size, self.options.max_concurrency)

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        """Keys (relative to the store prefix) equal to `prefix` or under `prefix/`, like a directory."""
        rel_base = f"{self.prefix}/" if self.prefix else ""
        if prefix:
            check_key(prefix)
            list_prefix = rel_base + prefix
        else:
            list_prefix = rel_base
        token: str | None = None
        while True:
            with self.errors("LIST", prefix or None):
                if token is None:
                    resp = self.client.list_objects_v2(
                        Bucket=self.bucket, Prefix=list_prefix, MaxKeys=self.list_page_size
                    )
                else:
                    resp = self.client.list_objects_v2(
                        Bucket=self.bucket,
                        Prefix=list_prefix,
                        MaxKeys=self.list_page_size,
                        ContinuationToken=token,
                    )
            for obj in resp.get("Contents", []):
                rel = obj["Key"][len(rel_base) :]
                # "snapshots/ab" must not match "snapshots/abc/...": a prefix names a directory.
                if not prefix or rel == prefix or rel.startswith(prefix + "/"):
                    yield rel
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(self._iter_keys(prefix))

    def delete_prefix(self, prefix: str) -> None:
        check_key(prefix)
        keys = self.list_keys(prefix)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch: list[ObjectIdentifierTypeDef] = [{"Key": self.full_key(k)} for k in keys[i : i + _DELETE_BATCH]]
            with self.errors("DELETE", prefix):
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            failed = resp.get("Errors", [])
            if failed:
                first = failed[0]
                raise StoreError(
                    f"DELETE {self.where(prefix)}: {len(failed)} objects not deleted, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )

    def close(self) -> None:
        """Close the connection pool (optional: it also goes with the store)."""
        with contextlib.suppress(Exception):
            self.client.close()
