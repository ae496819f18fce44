"""Where files live: a local folder or an object-storage URI (`s3://bucket/prefix`, `gs://bucket/prefix`), behind
the few file operations the feature store, the tile index and run folders need.

A location is a `Path` for local folders and a `str` URI for object storage; `join` keeps the kind. Object stores
go through pyarrow's filesystems (`pyarrow.fs.FileSystem.from_uri`), which read the standard settings from the
environment: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (or an instance role), `AWS_DEFAULT_REGION`, and
`AWS_ENDPOINT_URL` for S3-compatible servers (MinIO, Ceph, moto); GCS reads Google's default credentials.

Atomic writes, the store's contract (a file is complete or absent):
- local: a hidden temp file beside the target (a fresh name, created exclusively, never through a link), fsync,
  `os.replace`: a symlink planted at the target is replaced, never followed out of its folder.
- object storage: the object is serialised in memory and sent in one upload straight to its key. S3 and GCS make
  an object visible only when its upload completes, so a writer killed mid-upload leaves no object (an S3
  multipart upload it began stays invisible until a bucket lifecycle rule aborts it). pyarrow completes an
  upload when its stream is closed, even after an error, so nothing that can fail runs between open and close.
Appends (errors.jsonl) are not possible on object storage: there each record is an object of its own under
`<log>.d/`, and `read_records` returns them oldest first.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Union

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hnm_ray.core.errors import ConfigError, StoreError

Location = Union[Path, str]
TEMP_SUFFIX = ".tmp"
ENV_HELP = ("set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or use an instance role), AWS_DEFAULT_REGION, and "
            "AWS_ENDPOINT_URL for an S3-compatible server; for gs:// use Google application default credentials")


def is_uri(location: Location) -> bool:
    """Whether `location` is an object-storage URI (scheme://...) rather than a local path."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def location(value: str | Path) -> Location:
    """A path or URI as a location: URIs stay strings (without a trailing /), local paths become `Path`s."""
    text = str(value)
    if text.startswith("file://"):
        return Path(text[len("file://"):]).expanduser()
    return text.rstrip("/") if is_uri(text) else Path(text).expanduser()


def join(base: Location, *parts: str) -> Location:
    """`base` / parts, keeping its kind (a URI string or a Path)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def name(item: Location) -> str:
    """The last component of a location."""
    return str(item).rstrip("/").rsplit("/", 1)[-1]


def filesystem(item: Location) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a location; one filesystem per bucket is reused."""
    if not is_uri(item):
        return pafs.LocalFileSystem(), str(Path(item).expanduser().absolute())
    scheme, rest = str(item).split("://", 1)
    bucket = rest.split("/", 1)[0]
    return _bucket_filesystem(scheme, bucket), rest.rstrip("/")


@functools.lru_cache(maxsize=None)
def _bucket_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    try:
        return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise StoreError(f"cannot open {scheme}://{bucket}: {exc}. Use s3://BUCKET/PREFIX or gs://BUCKET/PREFIX, or "
                         f"a local folder; {ENV_HELP}") from exc


def check(value: str, key: str) -> None:
    """Fail fast (ConfigError naming `key`) when an object-storage location's bucket cannot be reached."""
    if not is_uri(value):
        return
    try:
        fs, path = filesystem(location(value))
        bucket = fs.get_file_info(path.split("/", 1)[0])
    except (StoreError, pa.ArrowException, OSError) as exc:
        raise ConfigError(key, f"{value} cannot be reached: {exc}. {ENV_HELP}") from exc
    if bucket.type == pafs.FileType.NotFound:
        raise ConfigError(key, f"bucket of {value} does not exist (or these credentials cannot see it); create it "
                               f"first, or {ENV_HELP}")


def is_file(item: Location) -> bool:
    """Whether a file (object) exists at `item`."""
    if not is_uri(item):
        return Path(item).is_file()
    fs, path = filesystem(item)
    return fs.get_file_info(path).type == pafs.FileType.File


def list_files(directory: Location, suffix: str = "", recursive: bool = False) -> list[Location]:
    """Files under `directory` ending with `suffix`, sorted; hidden names (temp files of live writers) left out."""
    if not is_uri(directory):
        root = Path(directory)
        if not root.is_dir():
            return []
        found = root.rglob(f"*{suffix}") if recursive else root.glob(f"*{suffix}")
        return sorted(p for p in found if p.is_file() and not p.name.startswith("."))
    fs, path = filesystem(directory)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    prefix = str(directory).split("://", 1)[0] + "://"
    return sorted(prefix + i.path for i in infos
                  if i.type == pafs.FileType.File and i.path.endswith(suffix) and not i.base_name.startswith("."))


def read_bytes(item: Location) -> bytes:
    """The whole content of a file."""
    if not is_uri(item):
        return Path(item).read_bytes()
    fs, path = filesystem(item)
    with fs.open_input_stream(path) as source:
        return source.read()


def read_table(item: Location, columns: list[str] | None = None, use_threads: bool = True) -> pa.Table:
    """A Parquet file as an Arrow table (one file: ParquetFile, ~2x faster than pq.read_table's dataset layer);
    `use_threads`: decode columns on Arrow's thread pool."""
    fs, path = filesystem(item)
    with fs.open_input_file(path) as source:
        parquet = pq.ParquetFile(source)
        missing = [c for c in columns or [] if c not in parquet.schema_arrow.names]
        if missing:  # ParquetFile.read would leave them out silently; pq.read_table raised this
            raise pa.ArrowInvalid(f"no column(s) {missing} in {item}")
        return parquet.read(columns=columns, use_threads=use_threads)


def read_schema(item: Location) -> pa.Schema:
    """A Parquet file's schema (footer only)."""
    fs, path = filesystem(item)
    with fs.open_input_file(path) as source:
        return pq.read_schema(source)


def num_rows(item: Location) -> int:
    """Rows of a Parquet file (footer only)."""
    fs, path = filesystem(item)
    with fs.open_input_file(path) as source:
        return pq.ParquetFile(source).metadata.num_rows


def write_table(table: pa.Table, item: Location, dictionary: bool | list[str] = True,
                compression: str | dict[str, str] = "zstd", statistics: bool | list[str] = True) -> Location:
    """Write `table` as Parquet, complete or absent (module docstring); OSError propagates, nothing left.
    `dictionary`, `compression` (a codec, or one per column), `statistics`: pyarrow's use_dictionary,
    compression and write_statistics. Locally the file is written straight into its temp file (no copy in memory)."""
    options = {"use_dictionary": dictionary, "compression": compression, "write_statistics": statistics}
    if is_uri(item):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **options)
        return write_bytes(sink.getvalue(), item)
    with _atomic_local(Path(item)) as sink:
        pq.write_table(table, sink, **options)
    return Path(item)


def write_bytes(data: bytes | pa.Buffer | str, item: Location) -> Location:
    """Write `data` (text as UTF-8) to `item` atomically: temp + fsync + rename locally (a symlink at `item` is
    replaced, not followed), one upload to the final key otherwise. Every file hnm-ray writes goes through here
    (or `write_table`)."""
    if isinstance(data, str):
        data = data.encode()
    if is_uri(item):
        fs, path = filesystem(item)
        stream = fs.open_output_stream(path)  # the object appears when close() completes the upload
        stream.write(data)
        stream.close()
        return item
    with _atomic_local(Path(item)) as sink:
        sink.write(memoryview(data))
    return Path(item)


@contextlib.contextmanager
def _atomic_local(final: Path) -> Iterator[BinaryIO]:
    """A local file to write `final` through: a fresh hidden temp file beside it (created exclusively, never through
    a link), fsynced and renamed over `final` when the block ends; removed when the block raises."""
    temp = final.parent / f".{final.stem}.{uuid.uuid4().hex[:12]}{final.suffix}{TEMP_SUFFIX}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temp, final)
    except BaseException:
        unlink_quietly(temp)
        raise


def refuse_links_out(folder: Path, key: str) -> None:
    """ConfigError naming `key` when a symlink under the local `folder` leads outside it: files written there (a
    checkpoint/ or heatmaps/ folder linked elsewhere) would land outside the folder. Links to files inside it are
    harmless (writes replace a linked file, never follow it)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        return
    for parent, folders, files in os.walk(root):
        for entry in (Path(parent) / n for n in folders + files):
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise ConfigError(key, f"{entry} is a symlink to {entry.resolve()}, outside {root}: hnm-ray writes "
                                       "only inside its folders; remove the link (or copy what it points to)")


def delete(item: Location) -> None:
    """Remove a file if it exists."""
    if not is_uri(item):
        Path(item).unlink(missing_ok=True)
        return
    fs, path = filesystem(item)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def unlink_quietly(path: Path) -> None:
    """Remove a local temp file; a failure to remove it must not hide the error being raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def append_record(log: Location, line: str) -> None:
    """Append one line to a log: one O_APPEND write locally, one object under `<log>.d/` on object storage."""
    if is_uri(log):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        write_bytes(line.encode(), join(f"{log}.d", f"{stamp}-{uuid.uuid4().hex[:8]}.json"))
        return
    path = Path(log)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never through a symlink
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())  # one write: appends of several processes do not interleave
    finally:
        os.close(fd)


def read_records(log: Location) -> list[dict]:
    """The JSON records of a log, oldest first (a line cut short by a killed writer is skipped)."""
    if is_uri(log):
        lines = [read_bytes(item).decode() for item in list_files(f"{log}.d", ".json")]
    else:
        lines = Path(log).read_text().splitlines() if Path(log).is_file() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def ray_storage(item: Location) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train/Tune's RunConfig: the filesystem travels with the
    trainer (with its endpoint), so workers need no environment of their own to reach the bucket."""
    if not is_uri(item):
        return str(item), None
    fs, path = filesystem(item)
    return path, fs


def local_files(local: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of the files under `local`; hidden names (temp files and folders of live
    writers, bookkeeping) left out."""
    found: dict[str, list[int]] = {}
    for path in sorted(local.rglob("*")):
        relative = path.relative_to(local)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        stat = path.stat()
        found[relative.as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return found


def upload_tree(local: Path, remote: Location, uploaded: dict[str, list[int]],
                last: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """Mirror the files of `local` to `remote`: upload those new or changed since `uploaded` (`local_files` as
    last uploaded), the `last` names after every other, then delete remote copies of files gone locally.
    Returns the new record; a sync killed half-way leaves the `last` files of the previous sync in place."""
    now = local_files(local)
    changed = [r for r in now if uploaded.get(r) != now[r]]
    for relative in sorted(changed, key=lambda r: r in last):
        write_bytes((local / relative).read_bytes(), join(remote, *relative.split("/")))
    for relative in sorted(set(uploaded) - set(now)):
        delete(join(remote, *relative.split("/")))
    return now


def download_tree(remote: Location, local: Path, overwrite: bool) -> list[str]:
    """Copy the files under `remote` into `local` (only the missing ones unless `overwrite`); returns the relative
    paths of every file under `remote`. A key that would land outside `local` (`..`, absolute) is a StoreError."""
    prefix = str(remote).rstrip("/") + "/"
    relatives = []
    for item in list_files(remote, recursive=True):
        relative = str(item)[len(prefix):]
        parts = relative.split("/")
        if relative.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise StoreError(f"object {item} has a key that would be written outside {local} ({relative!r}); "
                             f"remove it from {remote} (keys must not hold '..', '.', empty parts or '\\')")
        target = local.joinpath(*parts)
        if overwrite or not target.exists():
            write_bytes(read_bytes(item), target)
        relatives.append(relative)
    return relatives
