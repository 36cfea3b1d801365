"""Taking an entry's files in from a folder a client names (`lorakit adapters add`, POST /admin/adapters).

The folder is hostile: a file may be a FIFO (reading it blocks until someone writes), a device or a link to
/dev/zero (reading it never ends), a link to a file outside the folder (the server's own secrets), or be
replaced while it is read. So:

- only regular files inside the folder are opened (a symlink whose target lies inside the folder is fine),
  with O_NONBLOCK (opening a FIFO never blocks) and O_NOFOLLOW on the resolved path (a link swapped in after
  the check is refused), and the opened descriptor's type is checked with fstat;
- sizes are capped before reading (`caps`), and the copy stops at the cap even if the file grows;
- the files are copied FIRST, into a private staging folder, and the copy is what the registry then reads,
  validates, hashes and stores: a file swapped after the copy changes nothing, and a version's recorded hash
  is always the hash of the bytes that were checked and stored.

    with staged_copy(src, (CONFIG_NAME, WEIGHTS_NAME), caps, under=reg_staging) as copy:
        af = read_adapter(copy)   # errors name the client's folder, not the staging path
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from lorakit import faults
from lorakit.files import pid_alive

MAX_JSON_BYTES = 8 << 20  # adapter_config.json / mixture.json (4,096 patterns of 512 characters fit)
MAX_HEADER_BYTES = 100 << 20  # what safetensors itself allows for a header
CHUNK = 1 << 20


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return word
    return "special file"


def open_member(folder: str | Path, name: str, cap: int, inside: bool = True) -> tuple[int, int]:
    """(fd, size) of file `name` of `folder`, opened for reading: FileNotFoundError if absent, ValueError naming
    the file if it is not a regular file, lies outside the folder (when `inside`) or holds more than `cap`
    bytes. The caller closes the fd."""
    folder = Path(folder)
    p = folder / name
    if not os.path.lexists(p):
        if name.endswith(".safetensors") and os.path.lexists(folder / "adapter_model.bin"):
            raise ValueError(f"{str(folder / 'adapter_model.bin')!r} is a pickle file; lorakit reads safetensors only")
        raise FileNotFoundError(f"adapter {str(folder)!r} has no {name}")
    real = os.path.realpath(p)
    if inside:
        root = os.path.realpath(folder)
        if os.path.commonpath([real, root]) != root:
            raise ValueError(f"{str(p)!r} is a link to {real!r}, outside the adapter folder; only files inside "
                             "the folder are read (copy the file in)")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(folder)!r} has no {name} ({str(p)!r} is a dangling link)") from None
    except OSError as e:  # ELOOP: a link swapped in after realpath; EACCES; ENXIO: a socket
        raise ValueError(f"{str(p)!r} cannot be opened as a regular file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{str(p)!r} is a {_kind(st.st_mode)}, not a regular file")
        if st.st_size > cap:
            raise ValueError(f"{str(p)!r} holds {st.st_size:,} bytes; the limit for {name} is {cap:,}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_member(folder: str | Path, name: str, cap: int = MAX_JSON_BYTES, inside: bool = False) -> bytes:
    """The bytes of a small file of `folder` (a config), checked as open_member does."""
    fd, _ = open_member(folder, name, cap, inside)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"{str(Path(folder) / name)!r} grew past the limit for {name} ({cap:,} bytes) while read")
    return data


def copy_member(folder: Path, name: str, dest: Path, cap: int) -> None:
    """Copy file `name` of `folder` to `dest` (fsync'd), at most `cap` bytes, checked as open_member does."""
    fd, _ = open_member(folder, name, cap)
    n = 0
    with os.fdopen(fd, "rb") as src, open(dest, "xb") as out:
        while chunk := src.read(CHUNK):
            n += len(chunk)
            if n > cap:
                raise ValueError(f"{str(folder / name)!r} grew past the limit for {name} ({cap:,} bytes) while "
                                 "it was copied")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def adapter_cap(base_fp: dict | None, fallback: int = 64 << 30) -> int:
    """The most bytes an adapter's weights file for this base can need: every module of the base at full rank
    (min(out, in)) in float64, with a DoRA magnitude, plus the largest header. Larger is not an adapter for it."""
    shapes = (base_fp or {}).get("shapes") or {}
    if not shapes:
        return fallback
    elems = sum((o + i) * min(o, i) + o for o, i in (tuple(s)[:2] for s in shapes.values()))
    return 8 * elems + MAX_HEADER_BYTES


def staging_root(reg) -> Path | None:
    """Where a registry stages copies: beside its store when that is a local folder (same filesystem, removed
    by the next open if the process dies), else the system's temp folder."""
    store = getattr(reg, "store", None)
    return store / ".staging" if isinstance(store, Path) else None


@contextlib.contextmanager
def staged_copy(src: str | Path, files: dict[str, int], under: Path | None = None):
    """Copy `files` ({name: byte cap}) of folder `src` into a fresh private folder and yield its path; removed
    afterwards. ValueError / FileNotFoundError raised inside (by the copy or by the caller reading the copy)
    name `src`, not the private folder."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"adapter directory {str(src)!r} does not exist")
    if under is not None:
        under.mkdir(parents=True, exist_ok=True)
        tmp = under / f"{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="lorakit-add-"))
    try:
        for i, (name, cap) in enumerate(files.items()):
            copy_member(src, name, tmp / name, cap)
            faults.point("registry.copied", i)  # the copy is private from here: the source may change freely
        yield tmp
    except (ValueError, FileNotFoundError) as e:
        raise _relabel(e, tmp, src) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _relabel(e: Exception, tmp: Path, src: Path) -> Exception:
    msg = str(e).replace(str(tmp), str(src))
    if msg == str(e):
        return e
    try:
        return type(e)(msg)
    except TypeError:
        return ValueError(msg)


def clean_staging(root: Path) -> list[Path]:
    """Staging folders of processes that are gone (killed mid-add)."""
    gone = []
    if not root.is_dir():
        return gone
    for d in root.iterdir():
        pid = d.name.partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone
