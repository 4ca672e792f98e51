"""Artifact store: a local directory or ``s3://bucket/prefix``, through ``pyarrow.fs``.

The store knows bytes, JSON, Parquet and directories; what lives where under the root is the
artifact contract's (``cm_ray.artifacts``).

S3 endpoints other than AWS (moto, MinIO) come from ``AWS_ENDPOINT_URL``, as boto3 reads it.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from cm_ray.publish import LEGACY, POINTER, VERSIONS  # noqa: F401 - the layout of published dirs

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs




def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem() -> "pafs.S3FileSystem":
    """A pyarrow S3 filesystem honouring AWS_ENDPOINT_URL (http or https) and AWS_REGION."""
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem_and_path(uri: str) -> tuple["pafs.FileSystem", str]:
    """(pyarrow filesystem, path inside it) for a local path or s3:// URI."""
    import pyarrow.fs as pafs

    if is_s3(uri):
        parsed = urlparse(uri)
        return s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


class ArtifactStore:
    """Read and write run artifacts under one root, local or on S3."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/") if is_s3(root) else str(Path(root).expanduser().resolve())
        self.fs, self._base = filesystem_and_path(self.root)

    # -- addressing ------------------------------------------------------------------------
    def uri(self, *parts: str) -> str:
        """The user-facing URI of a path under the root (what Ray Data and PEFT are given)."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def fs_path(self, *parts: str) -> str:
        """The path of ``parts`` inside ``self.fs`` (what pyarrow readers are given)."""
        return posixpath.join(self._base, *parts) if parts else self._base


    @property
    def is_s3(self) -> bool:
        return is_s3(self.root)

    # -- queries ---------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.fs_path(*parts)).type != pafs.FileType.NotFound

    def listdir(self, *parts: str) -> list[str]:
        """Names directly under a directory (sorted); [] when it does not exist."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.fs_path(*parts), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))

    def files(self, *parts: str, suffix: str = "") -> list[str]:
        """Relative paths of all files under a directory, recursively."""
        import pyarrow.fs as pafs

        base = self.fs_path(*parts)
        sel = pafs.FileSelector(base, allow_not_found=True, recursive=True)
        return sorted(posixpath.relpath(i.path, base) for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def file_sizes(self, *parts: str) -> dict[str, int]:
        """{relative path: size} of every file under a directory ({} when it does not exist)."""
        import pyarrow.fs as pafs

        base = self.fs_path(*parts)
        sel = pafs.FileSelector(base, allow_not_found=True, recursive=True)
        return {posixpath.relpath(i.path, base): i.size for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File}

    # -- bytes / json ----------------------------------------------------------------------
    def write_bytes(self, data: bytes, *parts: str) -> str:
        path = self.fs_path(*parts)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        # Write to a temporary name then move, so readers never see half a file (local);
        # S3 PUTs are atomic already.
        if self.is_s3:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        else:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"  # one per writer: threads share a pid
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return self.uri(*parts)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.fs_path(*parts)) as f:
            return f.read()

    def write_json(self, obj: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def delete(self, *parts: str) -> None:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.fs_path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.fs_path(*parts))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.fs_path(*parts))

    # -- tables ----------------------------------------------------------------------------
    def write_table(self, table: "pa.Table | list[dict]", *parts: str) -> str:
        """Write one Parquet file (rows as a list of dicts or a pyarrow Table)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pylist(list(table))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.write_bytes(buf.getvalue(), *parts)

    def read_table(self, *parts: str) -> "pa.Table":
        """Read a Parquet file or a directory of Parquet files (hive partitions become columns)."""
        import pyarrow.dataset as pads
        import pyarrow.fs as pafs

        base = self.fs_path(*parts)
        if self.fs.get_file_info(base).type == pafs.FileType.File:
            return pads.dataset(base, filesystem=self.fs, format="parquet").to_table()
        # Only *.parquet files: a stage may keep its summary.json or temp files beside the data,
        # and names starting with "_" or "." (e.g. _stats/) are private to the writer.
        files = [posixpath.join(base, f) for f in self.files(*parts, suffix=".parquet")
                 if not any(p.startswith(("_", ".")) for p in f.split("/"))]
        if not files:
            raise FileNotFoundError(f"no Parquet files under {self.uri(*parts)}")
        return pads.dataset(files, filesystem=self.fs, format="parquet",
                            partitioning=pads.HivePartitioning.discover(), partition_base_dir=base).to_table()

    def read_rows(self, *parts: str) -> list[dict]:
        return self.read_table(*parts).to_pylist()

    # -- directories (adapters, checkpoints, models) ---------------------------------------
    def upload_dir(self, local_dir: str | Path, *parts: str) -> str:
        """Copy a local directory to ``parts`` under the root (replacing what was there).

        Not atomic (it deletes, then copies): what readers may load meanwhile (adapters, the
        router) is published with ``publish_dir`` instead."""
        import pyarrow.fs as pafs

        dest = self.fs_path(*parts)
        if not self.is_s3 and Path(local_dir).resolve() == Path(dest):
            return self.uri(*parts)
        self.delete(*parts)
        self.fs.create_dir(dest, recursive=True)
        pafs.copy_files(str(Path(local_dir).resolve()), dest,
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        return self.uri(*parts)

    # -- versioned directories: write a new version, then switch one pointer -----------------
    def publish_dir(self, local_dir: str | Path, *parts: str) -> str:
        """Publish a local directory at ``parts`` atomically; returns its version id.

        The files go to ``<parts>/versions/<content hash>/`` first; only then does one small
        pointer file, ``<parts>/current.json``, switch to it (a local rename or one S3 PUT). A
        crash before the switch leaves the previous version current; readers resolve through
        ``resolve_dir``. Afterwards every version but this one and the previous is deleted (a
        reader that resolved just before the switch still finds its files), and so are files
        written in place before versioning once they are no longer the previous version.
        Concurrent publishers of one directory are safe: the switch and the deletions happen
        under a per-directory lock (``cm_ray.publish``).
        """
        from cm_ray.publish import publish_dir

        return publish_dir(self, local_dir, *parts)

    def read_pointer(self, *parts: str) -> dict | None:
        """The pointer of a published directory ({version, previous, files, ...}); None when
        there is none, or it is not a pointer this code wrote."""
        try:
            ptr = self.read_json(*parts, POINTER)
        except (FileNotFoundError, OSError, ValueError):
            return None
        ok = isinstance(ptr, dict) and isinstance(ptr.get("version"), str) and isinstance(
            ptr.get("files"), dict) and ptr["version"].isalnum()
        return ptr if ok else None

    def resolve_dir(self, *parts: str) -> tuple[tuple[str, ...], str | None] | None:
        """Where the current version of a published directory lies: ``(parts of that version,
        version id)``; a directory written in place without a pointer is its own version (id
        None); None when nothing is there. The one way readers find an adapter or the router."""
        ptr = self.read_pointer(*parts)
        if ptr is not None:
            return (*parts, VERSIONS, ptr["version"]), ptr["version"]
        if self.exists(*parts, POINTER):
            return None  # a pointer that does not parse names nothing
        return ((*parts,), None) if self.exists(*parts) else None

    def download_dir(self, local_dir: str | Path, *parts: str) -> Path:
        """Copy ``parts`` under the root into a local directory; returns that directory."""
        import pyarrow.fs as pafs

        local_dir = Path(local_dir)
        if not self.is_s3 and Path(self.fs_path(*parts)) == local_dir.resolve():
            return local_dir
        if local_dir.exists():
            shutil.rmtree(local_dir)
        local_dir.mkdir(parents=True)
        pafs.copy_files(self.fs_path(*parts), str(local_dir.resolve()), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    def local_path(self, *parts: str) -> Path | None:
        """The local filesystem path for a local store; None on S3."""
        return None if self.is_s3 else Path(self.fs_path(*parts))

    # -- manifests -------------------------------------------------------------------------
    def write_manifest(self, stage: str, manifest: dict) -> str:
        from cm_ray.artifacts import manifest_file

        return self.write_json(manifest, *manifest_file(stage))

    def read_manifest(self, stage: str) -> dict | None:
        """A stage's manifest; None when there is none; ``UnreadableRecord`` when it does not parse."""
        from cm_ray.artifacts import manifest_file

        return self.read_record(*manifest_file(stage), what="manifest")

    def read_record(self, *parts: str, what: str = "record") -> dict | None:
        """A JSON object this code keeps (a manifest, fingerprints): None when absent; a file that
        is there but cannot be read as one is an ``UnreadableRecord`` naming it, never "nothing"."""
        try:
            data = self.read_bytes(*parts)
        except FileNotFoundError:
            return None
        try:
            obj = json.loads(data)
        except ValueError as e:  # not UTF-8, not JSON (cut short, overwritten)
            raise UnreadableRecord(self.uri(*parts), what, f"not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise UnreadableRecord(self.uri(*parts), what, f"a JSON {type(obj).__name__}, not an object")
        return obj


class UnreadableRecord(RuntimeError):
    """A bookkeeping file (manifest, fingerprints) that exists but cannot be read: an error naming
    it, so that nothing is deleted or redone on the strength of a record nobody could read."""

    def __init__(self, uri: str, what: str, why: str):
        self.uri = uri
        super().__init__(f"{uri}: unreadable {what} ({why}); nothing was deleted or recomputed: "
                         f"repair or remove it by hand")


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI if it does not exist (local roots: make the dir)."""
    if not is_s3(uri):
        Path(uri).expanduser().mkdir(parents=True, exist_ok=True)
        return
    import boto3

    bucket = urlparse(uri).netloc
    s3 = boto3.client("s3")
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        kwargs = {} if region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **kwargs)
