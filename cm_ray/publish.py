"""Versioned directories (adapters, the router): write a version, switch one pointer, collect old ones.

``<dir>/versions/<content hash>/`` holds each version; ``<dir>/current.json`` names the one
readers use (``ArtifactStore.resolve_dir``) and the one before it. Several processes may publish
the same directory at once (two trials of one adapter, a retried task beside a slow one): each
copies its version outside any lock, then, holding the directory's lock, checks that its version
is still complete, switches the pointer and deletes every version the pointer names neither as
current nor as previous. The switch and the collection therefore never interleave: the pointer
only ever names a complete version, and no collection deletes what a pointer names. A version
collected while its publisher was still copying it is copied again.

The lock: ``current.json.lock`` beside the pointer, held with ``filelock`` on a local root (the
kernel releases it when its holder dies); on S3 an object created with ``If-None-Match: *`` (one
writer wins), deleted on release, and taken over (``If-Match`` its ETag) once a holder that died
left it past its lease.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

VERSIONS = "versions"
"""Subdirectory of a published directory holding its versions, one per content hash."""
POINTER = "current.json"
"""A published directory's pointer: names the version readers use (written last, atomically)."""
LEGACY = "."
"""``previous`` of a first versioned publish over a directory that was written in place."""
LOCK = POINTER + ".lock"
"""The publish lock of a versioned directory (a file locally, an object on S3 while held)."""
LEASE_S = 300.0
"""How long an S3 lock left by a publisher that died blocks the next one."""
ATTEMPTS = 5
"""How often a publisher copies its version again when others collected it meanwhile."""


def content_version(src: Path) -> tuple[str, dict[str, int]]:
    """(version id: a hash of the relative paths, sizes and bytes, {relative path: size})."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(src).as_posix()}\0{p.stat().st_size}\0".encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16], {p.relative_to(src).as_posix(): p.stat().st_size for p in files}


@contextmanager
def publish_lock(store, *parts: str, timeout_s: float = 600.0, clock=time.time):
    """Hold the publish lock of the versioned directory ``parts`` (TimeoutError after ``timeout_s``)."""
    if not store.is_s3:
        from filelock import FileLock, Timeout

        path = Path(store.fs_path(*parts, LOCK))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(path), timeout=timeout_s):
                yield
        except Timeout:
            raise TimeoutError(f"{store.uri(*parts, LOCK)}: held by another publisher for {timeout_s:g} s") from None
        return
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3")
    bucket, key = store.fs_path(*parts, LOCK).split("/", 1)
    start, etag = clock(), None
    while etag is None:
        body = json.dumps({"owner": uuid.uuid4().hex, "expires": clock() + LEASE_S}).encode()
        try:
            etag = s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
            break
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
        try:
            held = s3.get_object(Bucket=bucket, Key=key)
            expires = json.loads(held["Body"].read()).get("expires", 0)
            if not isinstance(expires, (int, float)) or expires < clock():  # its holder died
                etag = s3.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=held["ETag"])["ETag"]
                break
        except (ClientError, ValueError):
            pass  # released, or taken over by another publisher, meanwhile: try again
        if clock() - start > timeout_s:
            raise TimeoutError(f"{store.uri(*parts, LOCK)}: held by another publisher for {timeout_s:g} s")
        time.sleep(random.uniform(0.02, 0.2))
    try:
        yield
    finally:
        try:
            s3.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        except ClientError:
            pass  # taken over after our lease ran out: the new holder's object stays


def publish_dir(store, local_dir: str | Path, *parts: str) -> str:
    """``ArtifactStore.publish_dir``: publish ``local_dir`` as a version of ``parts`` (module doc)."""
    import pyarrow.fs as pafs

    src = Path(local_dir).resolve()
    version, sizes = content_version(src)
    for _ in range(ATTEMPTS):
        if (store.read_pointer(*parts) or {}).get("version") == version:
            return version  # already current
        if store.file_sizes(*parts, VERSIONS, version) != sizes:  # absent, or a crashed copy
            dest = store.fs_path(*parts, VERSIONS, version)
            store.fs.create_dir(dest, recursive=True)
            pafs.copy_files(str(src), dest, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=store.fs)
        with publish_lock(store, *parts):
            if store.file_sizes(*parts, VERSIONS, version) != sizes:
                continue  # collected by another publisher while it was copied: copy again
            _switch(store, version, sizes, parts)
        return version
    raise RuntimeError(f"{store.uri(*parts)}: version {version} was collected by concurrent publishers "
                       f"{ATTEMPTS} times before its pointer switch")


def _switch(store, version: str, sizes: dict, parts: tuple[str, ...]) -> None:
    """Under the lock: point ``current.json`` at ``version``, then collect what it no longer names."""
    current = store.read_pointer(*parts)
    if current and current["version"] == version:
        return
    unreadable = current is None and store.exists(*parts, POINTER)
    if current:
        previous = current["version"]
    else:  # a directory written in place (no pointer yet) is the previous version
        previous = LEGACY if any(n != VERSIONS and not n.startswith(POINTER) for n in store.listdir(*parts)) else None
    store.write_json({"format": 1, "version": version, "previous": previous,
                      "published_at": time.time(), "files": sizes}, *parts, POINTER)
    if unreadable:
        return  # the old pointer could not be read: nothing is known to be unused, nothing deleted
    for old in set(store.listdir(*parts, VERSIONS)) - {version, previous}:
        store.delete(*parts, VERSIONS, old)
    if previous != LEGACY:
        for old in set(store.listdir(*parts)) - {VERSIONS, POINTER, LOCK}:  # + crashed pointer temps
            store.delete(*parts, old)
