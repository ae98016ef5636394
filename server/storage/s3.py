"""An S3-compatible bucket (AWS S3, MinIO, Ceph, R2 ...), shared by every API replica and worker.

`WAN_VACE_STORAGE_URL=s3://bucket/some/prefix` keeps the key `outputs/<job>/<token>/output.mp4`
as the object `some/prefix/outputs/<job>/<token>/output.mp4` (no prefix: at the bucket's root).
Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile,
an instance role); `WAN_VACE_S3_ENDPOINT_URL` names a server other than AWS, reached path-style
(`endpoint/bucket/key`), which is what MinIO and most others expect.

The contract, on S3's terms:
- Atomic writes: S3 makes an object visible whole when its PUT (or the completion of a
  multipart upload, which `upload_file` uses for big files and aborts on failure) succeeds, and
  never a part of one; readers racing a writer see the old object or the new one.
- Listing is `list_objects_v2` by prefix (LastModified is the mtime, to the second), deleting is
  `delete_objects` in batches of 1000 (S3's limit per call). S3 does not say whether a deleted
  key existed, so `delete` asks first.
- No local files (`has_local_files` is False): the `/media/` route streams through `stat`
  (HEAD) and `open_range` (a ranged GET).
- Errors: a missing key is a KeyError (NoSuchKey, 404); anything else the endpoint answers or
  fails with (unreachable, 5xx, throttling, credentials refused) is `StorageUnavailable`, which
  the API answers with 503. botocore's standard retry mode has already retried the transient
  ones a few times by then. `check()` (called by `open_storage` at start-up) turns a missing
  bucket or refused credentials into a start-up error that says what to fix.

Presigned mode (`WAN_VACE_MEDIA_URLS=presigned`): `url()` answers a presigned GET of the object,
valid `presign_seconds`. Outputs are stored as keys and rendered at read time, so every poll
gets a fresh URL. `key_from_url` recognises those URLs, signed or not, expired or not, so a
client that sends one back as an input is read from the bucket directly. `presigned_put` hands
the two-step upload a presigned PUT (see server/routes/uploads.py for what that PUT does not
check).
"""

from __future__ import annotations

import logging
import mimetypes
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from server.storage.base import (
    InvalidKey,
    Storage,
    StorageUnavailable,
    StoredObject,
    check_key,
    check_prefix,
    media_url,
)

log = logging.getLogger("wan_vace.storage")

_SESSION: boto3.session.Session | None = None
_SESSION_LOCK = threading.Lock()

_MAX_S3_KEY_BYTES = 1024  # S3's limit on a whole object key, the prefix included
_DELETE_BATCH = 1000  # S3's limit of keys per delete_objects call
_CHUNK = 1 << 20
# What S3 answers for a key that names no object (HEAD answers a bare status code). NoSuchBucket
# is not one of them: a bucket gone at run time is an outage, not a missing file.
_MISSING = {"NoSuchKey", "404", "NotFound"}
_REFUSED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
            "ExpiredToken", "AuthorizationHeaderMalformed"}  # fmt: skip


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _content_type(key: str) -> str:
    # The same guess the /media/ route makes from the name, so a presigned GET serves the type
    # the API would (the name's extension comes from the sniffed type of an upload).
    return mimetypes.guess_type(key.rsplit("/", 1)[-1])[0] or "application/octet-stream"


class S3Storage(Storage):
    has_local_files = False

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_seconds: float = 3600.0,
        presigned_urls: bool = False,
        multipart_threshold: int = 64 << 20,
        max_attempts: int = 3,
    ):
        if not bucket:
            raise ValueError("an S3 storage URL names a bucket: s3://bucket[/prefix]")
        prefix = prefix.strip("/")
        try:
            check_prefix(prefix)
        except InvalidKey:
            raise ValueError(f"the S3 key prefix {prefix!r} is not a valid key prefix") from None
        self.bucket, self.prefix = bucket, prefix
        self._root = prefix + "/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.presign_seconds = presign_seconds
        self.presigned_urls = presigned_urls
        config = Config(
            region_name=region,
            signature_version="s3v4",
            # Path-style for non-AWS servers: MinIO and most others do not serve virtual hosts.
            s3={"addressing_style": "path"} if endpoint_url else {},
            # "standard" retries throttling, 5xx and connection errors with backoff; short
            # timeouts, so an unreachable endpoint fails a request in seconds, not minutes.
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=32,  # the API streams from a thread pool of about this size
        )
        # Clients are thread-safe for calls, sessions not for making clients: one session of
        # ours (it caches the service model, which takes ~0.1 s to load), used under a lock.
        with _SESSION_LOCK:
            global _SESSION
            _SESSION = _SESSION or boto3.session.Session()
            self.client: Any = _SESSION.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold, max_concurrency=4)

    def __repr__(self) -> str:
        return f"S3Storage({self._where()})"

    def _where(self) -> str:
        at = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{at}"

    def _full(self, key: str) -> str:
        full = self._root + check_key(key)
        if len(full.encode("utf-8")) > _MAX_S3_KEY_BYTES:  # the prefix leaves too little room
            raise InvalidKey(key)
        return full

    def _unavailable(self, what: str, e: Exception) -> StorageUnavailable:
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            detail = f"{err.get('Code', '?')}: {err.get('Message') or 'no message'}"
        else:
            detail = str(e) or type(e).__name__
        log.warning("S3 storage %s: could not %s (%s)", self._where(), what, detail)
        return StorageUnavailable(
            f"The media storage is unavailable right now (could not {what} in bucket {self.bucket!r}: "
            f"{detail}); try again in a few seconds."
        )

    # Start-up -----------------------------------------------------------------------------------
    def check(self) -> None:
        """A cheap HEAD of the bucket, so a missing bucket or refused credentials stop the server
        at start-up with what to fix, instead of failing every job later. RuntimeError."""
        where = self._where()
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise RuntimeError(
                f"no S3 credentials found for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "name a profile with AWS_PROFILE, or run with an instance role"
            ) from None
        except ClientError as e:
            code = _code(e)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise RuntimeError(
                    f"the S3 bucket {self.bucket!r} does not exist ({where}); create it, or fix "
                    "WAN_VACE_STORAGE_URL / WAN_VACE_S3_ENDPOINT_URL"
                ) from None
            if code in _REFUSED:
                raise RuntimeError(
                    f"S3 refused our credentials for the bucket {self.bucket!r} ({where}, {code}); check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile or role) and the bucket's policy"
                ) from None
            raise RuntimeError(f"the S3 bucket {self.bucket!r} could not be checked ({where}): {e}") from None
        except BotoCoreError as e:
            raise RuntimeError(
                f"the S3 endpoint of {where} cannot be reached ({e}); check WAN_VACE_S3_ENDPOINT_URL "
                "and that the server is up"
            ) from None

    # Writing ------------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> str:
        full = self._full(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=_content_type(key))
        except (ClientError, BotoCoreError) as e:
            raise self._unavailable("store an object", e) from e
        return key

    def put_file(self, key: str, src: str | Path) -> str:
        full = self._full(key)
        src = Path(src)
        if not src.is_file():  # the caller's mistake, not an outage: the OSError it would be locally
            raise FileNotFoundError(2, "No such file", str(src))
        try:
            self.client.upload_file(
                str(src),
                self.bucket,
                full,
                ExtraArgs={"ContentType": _content_type(key)},
                Config=self._transfer,
            )
        except (S3UploadFailedError, ClientError, BotoCoreError) as e:
            raise self._unavailable("store an object", e) from e
        return key

    # Reading ------------------------------------------------------------------------------------
    def _head(self, key: str) -> dict[str, Any]:
        full = self._full(key)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as e:
            if _code(e) in _MISSING:
                raise KeyError(key) from None
            raise self._unavailable("look up an object", e) from e
        except BotoCoreError as e:
            raise self._unavailable("look up an object", e) from e

    def stat(self, key: str) -> StoredObject:
        head = self._head(key)
        return StoredObject(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except KeyError:  # InvalidKey included
            return False
        return True

    def _get(self, key: str, byte_range: str | None = None) -> Any:
        """The open body of the object (of `byte_range`, an HTTP Range value); None when the
        range starts past the end."""
        full = self._full(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if byte_range:
            args["Range"] = byte_range
        try:
            return self.client.get_object(**args)["Body"]
        except ClientError as e:
            if _code(e) in _MISSING:
                raise KeyError(key) from None
            if _code(e) == "InvalidRange":
                return None
            raise self._unavailable("read an object", e) from e
        except BotoCoreError as e:
            raise self._unavailable("read an object", e) from e

    def read_bytes(self, key: str) -> bytes:
        body = self._get(key)
        try:
            return body.read()
        except BotoCoreError as e:  # the connection broke halfway (botocore wraps urllib3's errors)
            raise self._unavailable("read an object", e) from e
        finally:
            body.close()

    def open_range(self, key: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        if stop is not None and stop <= start:
            self._head(key)  # nothing to read, but a missing key is still a KeyError
            return iter(())
        if start == 0 and stop is None:
            body = self._get(key)
        else:
            body = self._get(key, f"bytes={start}-{'' if stop is None else stop - 1}")
        if body is None:
            return iter(())
        return self._stream(body)

    def _stream(self, body: Any) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(_CHUNK)
        except BotoCoreError as e:
            raise self._unavailable("read an object", e) from e
        finally:
            body.close()  # also when the reader stops early: the connection goes back to the pool

    # Listing and deleting (retention) -----------------------------------------------------------
    def iter_objects(self, prefix: str = "") -> Iterator[StoredObject]:
        full = self._full(check_prefix(prefix)) if prefix else self._root
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        try:
            for page in pages:
                for o in page.get("Contents", ()):
                    name = o["Key"]
                    # A prefix names whole components: `outputs/job1` lists `outputs/job1/...`
                    # (and an object named exactly so), never `outputs/job10/...`.
                    if prefix and name != full and not name.startswith(full + "/"):
                        continue
                    key = name[len(self._root) :]
                    try:
                        check_key(key)
                    except InvalidKey:  # put there by something else (`a//b`, `x/`): names nothing of ours
                        continue
                    yield StoredObject(key, int(o["Size"]), o["LastModified"].timestamp())
        except (ClientError, BotoCoreError) as e:
            raise self._unavailable("list objects", e) from e

    def delete(self, key: str) -> bool:
        try:
            full = self._full(key)
        except InvalidKey:
            return False
        if not self.exists(key):
            return False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except (ClientError, BotoCoreError) as e:
            raise self._unavailable("delete an object", e) from e
        return True

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise InvalidKey(prefix)  # never "everything": retention always names what goes
        check_prefix(prefix)
        keys = [self._root + o.key for o in self.iter_objects(prefix)]
        removed = 0
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            try:
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except (ClientError, BotoCoreError) as e:
                raise self._unavailable("delete objects", e) from e
            errors = answer.get("Errors", [])
            removed += len(batch) - len(errors)
            if errors:
                first = errors[0]
                raise StorageUnavailable(
                    f"The media storage refused to delete {len(errors)} of {len(batch)} objects in bucket "
                    f"{self.bucket!r} ({first.get('Code')}: {first.get('Message')}); they stay until the next try."
                )
        return removed

    # URLs ---------------------------------------------------------------------------------------
    def url(self, base_url: str, key: str) -> str:
        if not self.presigned_urls:
            return media_url(base_url, key)
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._root + key},
            ExpiresIn=max(1, int(self.presign_seconds)),
        )

    def presigned_put(self, key: str, content_type: str, expires_s: float) -> str | None:
        if not self.presigned_urls:
            return None
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._full(key)}
        if content_type:
            # Signed: a PUT with another Content-Type is refused by S3 (SignatureDoesNotMatch).
            params["ContentType"] = content_type
        return self.client.generate_presigned_url(
            "put_object", Params=params, ExpiresIn=max(1, int(expires_s))
        )

    @cached_property
    def _bucket_bases(self) -> tuple[str, ...]:
        """`host/path` that our objects' URLs start with (before the quoted key), lower-cased host:
        the form the client's presigned URLs take, and both addressing styles on its endpoint."""
        root = quote(self._root)
        bases = set()
        endpoint = urlsplit(self.client.meta.endpoint_url)
        host = endpoint.netloc.lower()
        path = endpoint.path.rstrip("/")
        bases.add(f"{host}{path}/{self.bucket}/{root}")  # path style
        bases.add(f"{self.bucket.lower()}.{host}{path}/{root}")  # virtual-host style
        try:
            probe = urlsplit(
                self.client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": self._root + "k"}, ExpiresIn=60
                )
            )
            if probe.path.endswith("/k"):
                bases.add(probe.netloc.lower() + probe.path[:-1])
        except (BotoCoreError, ClientError):  # no credentials to sign with: the endpoint forms do
            pass
        return tuple(bases)

    def key_from_url(self, url: str, base_urls: list[str]) -> str | None:
        key = super().key_from_url(url, base_urls)
        if key is not None:
            return key
        try:
            parts = urlsplit(url.strip())
        except ValueError:
            return None
        if parts.scheme not in ("http", "https"):
            return None
        here = parts.netloc.lower() + parts.path
        for base in self._bucket_bases:
            if here.startswith(base) and len(here) > len(base):
                try:
                    return check_key(unquote(here[len(base) :]))
                except InvalidKey:
                    return None
        return None
