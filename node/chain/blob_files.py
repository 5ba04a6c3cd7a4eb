"""Blob files beside the database, content-addressed: root/ab/abcdef… (hex digest). A blob is written to a
temporary name (hashed while it streams in), fsync'd and renamed, so its hash name never shows a torn file. No
SQLite here: the index of these files is blob_store.py's."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .db import StoreError


class BlobWriteError(StoreError):
    """A blob file could not be written (an OSError other than a full disk)."""


class DiskFullError(BlobWriteError):
    """No space (or quota) left for a blob: stop fetching blobs, keep voting."""


_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="blob-fsync")


def _fsync(path: Path) -> bool:
    """fsync a file or directory; False if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def default_blob_dir(db: Path) -> Path:
    """data/chain.sqlite -> data/blobs; any other name gets its own directory, so stores sharing a folder
    (tests, tools) never prune each other's files."""
    return db.parent / "blobs" if db.name == "chain.sqlite" else db.parent / f"{db.stem}.blobs"


class BlobFiles:
    """One file per blob at root/ab/abcdef… (hex digest). A blob is written under a temporary name in the same
    directory, fsync'd and renamed, so neither a process crash nor a power cut shows a partial file under its hash
    name; the directory entry is made durable when its height commits (make_durable, before the index row).
    ChainStore.open still re-hashes un-indexed files (a file from before this rule, or a disk that lies)."""

    TMP = ".tmp-"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._dirty_dirs: set[Path] = set()  # renamed into since the last make_durable

    def path(self, h: bytes) -> Path:
        x = h.hex()
        return self.root / x[:2] / x

    def exists(self, h: bytes) -> bool:
        return os.path.exists(self.path(h))  # one stat, no read

    def read(self, h: bytes) -> bytes | None:
        try:
            with open(self.path(h), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, h: bytes, data: bytes) -> bool:
        """Write unless present; True if written. No fsync: make_durable does that when the height commits."""
        p = self.path(h)
        try:
            if os.stat(p).st_size == len(data):
                return False
        except FileNotFoundError:
            pass  # a file of the wrong size is corrupt: replaced below
        tmp = p.parent / f"{self.TMP}{p.name}.{os.getpid()}.{threading.get_ident()}"
        try:
            if not p.parent.is_dir():
                p.parent.mkdir(parents=True, exist_ok=True)
                with self._lock:
                    self._dirty_dirs.add(self.root)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)  # data durable before the name: a torn file never appears under its hash
            finally:
                os.close(fd)
            os.replace(tmp, p)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"disk full writing blob {h.hex()[:16]} under {self.root}: {exc}") from None
            raise BlobWriteError(f"cannot write blob {h.hex()[:16]} under {self.root}: {exc}") from None
        with self._lock:
            self._dirty_dirs.add(p.parent)
        return True

    def remove(self, h: bytes) -> None:
        self.path(h).unlink(missing_ok=True)

    def sink(self, h: bytes) -> BlobSink:
        """A temporary file to stream `h` into (see BlobSink)."""
        return BlobSink(self, h)

    def reader(self, h: bytes) -> FileReader | None:
        try:
            return FileReader(self.path(h))
        except FileNotFoundError:
            return None

    def make_durable(self, hashes: Sequence[bytes]) -> list[bytes]:
        """fsync these blobs' data and every directory renamed into since the last call, all in parallel (the
        file system can share one journal commit among them); returns the hashes present. Data and directory
        order does not matter here: nothing is indexed before all are done, and open() re-hashes what is not."""
        with self._lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        paths = [self.path(h) for h in hashes]
        done = list(_POOL.map(_fsync, [*paths, *dirs]))
        return [h for h, ok in zip(hashes, done, strict=False) if ok]

    def scan(self) -> Iterator[tuple[bytes | None, Path]]:
        """Every file: (hash, path), or (None, path) for a temporary or foreign name."""
        if not self.root.is_dir():
            return
        for sub in os.scandir(self.root):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for e in os.scandir(sub.path):
                try:
                    h = bytes.fromhex(e.name) if len(e.name) == 64 and e.name.startswith(sub.name) else None
                except ValueError:
                    h = None
                yield h, Path(e.path)


_SEQ = itertools.count()


class BlobSink:
    """A blob arriving in pieces: written to a temporary name and hashed in the same pass, then (commit) checked
    against its hash, fsync'd and renamed. Until then nothing is visible under the hash name; a crash leaves only a
    temporary file, which ChainStore.open deletes. One writer at a time (calls may come from different threads)."""

    def __init__(self, files: BlobFiles, h: bytes) -> None:
        self.files = files
        self.h = h
        self.size = 0
        self._sha = hashlib.sha256()
        p = files.path(h)
        self.tmp = p.parent / f"{BlobFiles.TMP}{p.name}.{os.getpid()}.{next(_SEQ)}"
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            try:
                if not self.tmp.parent.is_dir():
                    self.tmp.parent.mkdir(parents=True, exist_ok=True)
                    with self.files._lock:
                        self.files._dirty_dirs.add(self.files.root)
                self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as exc:
                raise _write_error(exc, self.h, self.files.root) from None
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        fd = self._open()
        self._sha.update(data)
        view = memoryview(data).cast("B")
        self.size += len(view)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.h, self.files.root) from None

    def commit(self) -> bool:
        """True if what was written hashes to h (now durable under its name); False (and removed) otherwise."""
        fd = self._open()
        if self._sha.digest() != self.h:
            self.abort()
            return False
        p = self.files.path(self.h)
        try:
            os.fsync(fd)
            os.close(fd)
            self._fd = None
            os.replace(self.tmp, p)
        except OSError as exc:
            self.abort()
            raise _write_error(exc, self.h, self.files.root) from None
        with self.files._lock:
            self.files._dirty_dirs.add(p.parent)
        return True

    def abort(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def _write_error(exc: OSError, h: bytes, root: Path) -> BlobWriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full writing blob {h.hex()[:16]} under {root}: {exc}")
    return BlobWriteError(f"cannot write blob {h.hex()[:16]} under {root}: {exc}")


class FileReader:
    """Random access to a blob file (the tensor codec's BlobReader): reads with pread, so concurrent readers share
    the descriptor; the open descriptor keeps the data readable even if the blob is pruned meanwhile. Its content
    was hash-checked when written (and re-hashed at open if it was never indexed), so readers do not hash again."""

    _fd: int | None = None  # set before open can fail, so __del__ of a half-made reader is quiet

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, n: int) -> bytes:
        if self._fd is None:
            raise ValueError("blob reader is closed")
        out = os.pread(self._fd, n, offset)
        if len(out) < n and offset + len(out) < self.size:  # a short read: rare, finish it
            parts = [out]
            got = len(out)
            while got < n:
                more = os.pread(self._fd, n - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            out = b"".join(parts)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()
