"""Content-addressed adapter files: one blob per content hash, shared by every version (of any name) whose
files hash the same, and read by every server replica.

    store = open_store("/mnt/shared/lorakit-store")        # a directory (a shared filesystem's mount)
    store = open_store("s3://bucket/lorakit")               # any fsspec URL, where fsspec is installed
    store.put(src_dir, ("adapter_config.json", "adapter_model.safetensors"), sha)
    store.local_dir(sha)                                    # a local directory holding those files

A blob is `<root>/<sha[:2]>/<sha>/` with the files of the entry (an adapter's two PEFT files, a mixture's
two). The sha is `refs.content_sha256` over those files in order, so a blob's name says what it must hold:
`verify` re-hashes it wherever files are loaded, and a blob that does not match is refused.

Writes are atomic. A directory store copies into `<root>/.tmp-<sha>-<pid>-<ns>/`, checks the copy's hash
and renames it into place; deletion renames the blob to `<root>/.trash-...` first, so a blob directory is
either whole or absent. An fsspec store (objects, no directory rename) writes each file as one object and a
`.complete` marker last; a blob without its marker does not exist, and deletion removes the marker first.
Replicas read an fsspec blob through a local cache (`$LORAKIT_STORE_CACHE`, default
~/.cache/lorakit/store), downloaded to a temp name, verified, renamed.

The store decides nothing about which blobs are live: the registry (registry_pg.py) writes and deletes a blob
while it holds that hash's lock, and collects leftovers (`leftovers`) of writers that died.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from lorakit import faults
from lorakit.adapters.refs import content_sha256

log = logging.getLogger("lorakit.registry")
SHA_RE = re.compile(r"[0-9a-f]{64}")
MARKER = ".complete"


def verify(path: Path, sha: str, files: tuple[str, ...]) -> Path:
    """`path` if its `files` hash to `sha`; ValueError naming the directory otherwise."""
    got = content_sha256(path, files)
    if got != sha:
        raise ValueError(f"adapter files in {str(path)!r} do not match their registered content hash: "
                         f"sha256 {got[:16]}..., registered {sha[:16]}... (changed or damaged in the store)")
    return path


def _check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
        raise ValueError(f"not a content hash: {sha!r} (expected 64 lowercase hex digits)")
    return sha


class DirStore:
    """Blobs in a directory: local, or a shared filesystem (NFS, CephFS, ...) every replica mounts."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def blob(self, sha: str) -> Path:
        return self.root / _check_sha(sha)[:2] / sha

    def has(self, sha: str, files: tuple[str, ...]) -> bool:
        d = self.blob(sha)
        return all((d / f).is_file() for f in files)

    def put(self, src: Path, files: tuple[str, ...], sha: str) -> None:
        """Copy `files` of `src` in as blob `sha` (call under that hash's lock)."""
        dest = self.blob(sha)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{sha}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            tmp.mkdir()
            for f in files:
                shutil.copyfile(Path(src) / f, tmp / f)
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            verify(tmp, sha, files)  # the source did not change under the copy
            faults.point("registry.store.copied")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():  # a blob missing a file: a damaged one, replaced whole
                self.delete(sha)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def delete(self, sha: str) -> None:
        d = self.blob(sha)
        if not d.exists():
            return
        trash = self.root / f".trash-{sha}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(d, trash)  # the blob is gone at once; the files go after
        faults.point("registry.store.trashed")
        shutil.rmtree(trash, ignore_errors=True)

    def local_dir(self, sha: str, files: tuple[str, ...] | None = None) -> Path:
        return self.blob(sha)

    def shas(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(b.name for d in self.root.iterdir() if len(d.name) == 2 and d.is_dir()
                      for b in d.iterdir() if SHA_RE.fullmatch(b.name))

    def leftovers(self) -> list[tuple[str | None, Path]]:
        """(sha or None, path) of what interrupted writers and deleters left: temp copies (their sha, to be
        removed only while nobody holds that hash's lock) and trash (None: nobody uses it)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = re.fullmatch(r"\.(tmp|trash)-([0-9a-f]{64})-.*", p.name)
            if m:
                out.append((m.group(2) if m.group(1) == "tmp" else None, p))
        return out

    def remove_leftover(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


class FsspecStore:
    """Blobs as objects under an fsspec URL (s3://, gs://, az://, file://, ...): each file one object, a
    `.complete` marker written last; read through a verified local cache."""

    def __init__(self, url: str, cache: str | Path | None = None):
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"store {url!r} is a URL: reading it needs fsspec (pip install fsspec and the "
                             "filesystem's package, e.g. s3fs), or give a directory") from None
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.cache = Path(cache or os.environ.get("LORAKIT_STORE_CACHE")
                          or Path.home() / ".cache" / "lorakit" / "store").expanduser()

    def _key(self, sha: str, name: str = "") -> str:
        return f"{self.root}/{_check_sha(sha)[:2]}/{sha}" + (f"/{name}" if name else "")

    def has(self, sha: str, files: tuple[str, ...]) -> bool:
        return self.fs.exists(self._key(sha, MARKER))

    def put(self, src: Path, files: tuple[str, ...], sha: str) -> None:
        verify(Path(src), sha, files)
        if self.fs.exists(self._key(sha, MARKER)):
            return
        self.fs.makedirs(self._key(sha), exist_ok=True)  # a no-op on object stores
        for f in files:
            self.fs.put_file(str(Path(src) / f), self._key(sha, f))
        faults.point("registry.store.copied")
        self.fs.pipe_file(self._key(sha, MARKER), sha.encode())

    def delete(self, sha: str) -> None:
        if self.fs.exists(self._key(sha, MARKER)):
            self.fs.rm_file(self._key(sha, MARKER))
        faults.point("registry.store.trashed")
        if self.fs.exists(self._key(sha)):
            self.fs.rm(self._key(sha), recursive=True)

    def local_dir(self, sha: str, files: tuple[str, ...] | None = None) -> Path:
        """The local cache's copy of blob `sha`, downloaded and verified first if `files` are given and it is
        not there yet."""
        d = self.cache / _check_sha(sha)
        if files is None or all((d / f).is_file() for f in files):
            return d
        if not self.has(sha, files):
            raise FileNotFoundError(f"blob {sha[:16]}... is not in the store {self.url!r}")
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = self.cache / f".tmp-{sha}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            tmp.mkdir()
            for f in files:
                self.fs.get_file(self._key(sha, f), str(tmp / f))
            verify(tmp, sha, files)
            shutil.rmtree(d, ignore_errors=True)
            os.rename(tmp, d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return d

    def shas(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        out = []
        for prefix in self.fs.ls(self.root, detail=False):
            if len(prefix.rstrip("/").rsplit("/", 1)[-1]) == 2:
                out += [b.rstrip("/").rsplit("/", 1)[-1] for b in self.fs.ls(prefix, detail=False)]
        return sorted(s for s in out if SHA_RE.fullmatch(s))

    def leftovers(self) -> list[tuple[str | None, str]]:
        """Blobs without their marker (a writer died mid-way, or a deleter did): removed under the hash's lock."""
        return [(s, self._key(s)) for s in self.shas() if not self.fs.exists(self._key(s, MARKER))]

    def remove_leftover(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def open_store(spec: str | Path):
    """A directory path -> DirStore; a URL (scheme://...) -> FsspecStore."""
    s = str(spec)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s):
        return FsspecStore(s)
    return DirStore(s)
