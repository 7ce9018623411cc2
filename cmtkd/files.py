"""Safe files without torch: atomic writes, sealed JSON, the run-directory lock, temp-file cleanup.

Standard library only, so the workflow scripts (``collect_runs.py``) verify results without torch.

- Atomic writes: the bytes go to a temp file in the same directory (fsync, then rename over the
  target), so a kill leaves the old file or the new one, never half of one. Temp files are named
  ``.NAME.cmtkd-XXXXXXXX.tmp``; :func:`remove_stale_temp_files` deletes only names of exactly that
  form (a user's ``.notes.tmp`` survives), and only under the run-directory lock.
- A write that fails (disk full, read-only file system, no permission) removes its temp file and
  raises a one-line :class:`~cmtkd.errors.UserError` naming the file and the fix.
- Sealed JSON (``metrics.json``, ``eval.json``): the object carries ``"sha256"``, the SHA-256 of the
  canonical JSON (sorted keys, no whitespace) of its other keys. :func:`read_sealed_json` checks it,
  so an edited or truncated result never reaches a table.
- :class:`RunLock`: ``fcntl.flock`` on ``RUN_DIR/.cmtkd.lock``; a second writer of the same run
  directory is refused with one line. The kernel drops the lock when its process dies (even by
  SIGKILL), so a killed run never leaves a stale lock behind (only the empty file, reused).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path

from cmtkd.errors import UserError

TEMP_MARKER = ".cmtkd-"
# mkstemp's random part: 8 characters of [a-z0-9_].
TEMP_NAME = re.compile(r"^\..+\.cmtkd-[a-z0-9_]{8}\.tmp$")
LOCK_FILE = ".cmtkd.lock"
SEAL_KEY = "sha256"

_OS_ERROR_FIX = {
    errno.ENOSPC: "no space left on device; free some space and rerun the same command",
    errno.EDQUOT: "disk quota exceeded; free some space and rerun the same command",
    errno.EROFS: "read-only file system; make the directory writable or work on a copy of it",
    errno.EACCES: "permission denied; make the directory writable or work on a copy of it",
    errno.EPERM: "operation not permitted; make the directory writable or work on a copy of it",
}


def os_error(path: str | Path, exc: OSError, action: str = "write") -> UserError:
    """A one-line error for an OSError while writing ``path``."""
    reason = _OS_ERROR_FIX.get(exc.errno, f"{exc.strerror or exc}; fix the cause and rerun the same command")
    return UserError(f"cannot {action} {path}: {reason} (nothing partial was kept)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; results should get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARKER}", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _FILE_MODE)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise os_error(path, exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def is_own_temp_file(path: Path) -> bool:
    return bool(TEMP_NAME.match(path.name))


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temp files of atomic writes that a hard kill (SIGKILL, power loss) interrupted: the
    cleanup in :func:`atomic_write_bytes` never runs then. Only names this module makes are touched.
    Call only while holding the directory's :class:`RunLock`."""
    removed = []
    for path in Path(directory).glob(f".*{TEMP_MARKER}*.tmp"):
        if is_own_temp_file(path) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# Larger than any file cmtkd writes (a CMT-KD ImageNet checkpoint of four AlexNets with momentum is ~2 GiB).
MAX_READ_BYTES = 16 * 2**30


# A file this long whose blocks on disk hold less than half of it is sparse (holes read as zeros):
# cmtkd writes every byte of its files, so such a file is damage or a trap, refused before reading it.
SPARSE_MIN_BYTES = 64 * 2**20


def is_sparse(info: os.stat_result) -> bool:
    return info.st_size > SPARSE_MIN_BYTES and info.st_blocks * 512 < info.st_size // 2


def read_regular_file(path: str | Path, limit: int = MAX_READ_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file (a symbolic link to one is fine) of at most ``limit``
    bytes that is not sparse (:func:`is_sparse`). Anything else raises OSError before a byte is read: a FIFO
    would block for ever, /dev/zero or a sparse file would fill memory with zeros it never stored, and a
    run directory or teacher path from elsewhere may hold them."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"{info.st_size / 2**30:.1f} GiB, more than any file cmtkd writes", str(path))
        if is_sparse(info):
            raise OSError(errno.EFBIG, f"a sparse file ({info.st_size / 2**20:,.0f} MiB long, "
                                       f"{info.st_blocks * 512 / 2**20:,.0f} MiB on disk), which cmtkd never writes",
                          str(path))
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------- sealed JSON
def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def json_digest(obj: dict) -> str:
    """SHA-256 of the canonical JSON of ``obj`` without its seal."""
    return sha256_bytes(_canonical({k: v for k, v in obj.items() if k != SEAL_KEY}))


def seal(obj: dict) -> dict:
    """``obj`` as JSON would give it back (tuples -> lists, other types -> str), plus its seal."""
    plain = json.loads(json.dumps({k: v for k, v in obj.items() if k != SEAL_KEY}, default=str))
    return {**plain, SEAL_KEY: json_digest(plain)}


def write_sealed_json(path: str | Path, obj: dict) -> dict:
    sealed = seal(obj)
    atomic_write_json(path, sealed)
    return sealed


# metrics.json and eval.json are a few KB; the cap bounds what a damaged or planted one makes us read.
MAX_JSON_BYTES = 64 * 2**20


def read_sealed_json(path: str | Path, fix: str) -> dict:
    """Read a JSON object written by :func:`write_sealed_json` and check its seal; any problem is a
    one-line UserError naming ``path`` and ``fix`` (what rebuilds the file)."""
    path = Path(path)
    try:
        text = read_regular_file(path, MAX_JSON_BYTES).decode()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({getattr(exc, 'strerror', None) or type(exc).__name__}); "
                        f"{fix}") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON (truncated or edited: {exc.msg} at line {exc.lineno}); "
                        f"{fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a JSON object; {fix}")
    if SEAL_KEY not in obj:
        raise UserError(f"{path} has no '{SEAL_KEY}' seal (written by an older cmtkd or by hand); {fix}")
    if obj[SEAL_KEY] != json_digest(obj):
        raise UserError(f"{path} fails its SHA-256 check (edited or damaged after cmtkd wrote it); {fix}")
    return obj


# ---------------------------------------------------------------------------------- run lock
class RunBusy(UserError):
    """Another process holds the run directory's lock."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``DIR/.cmtkd.lock`` for one writer of a run directory.

    ``what`` names the holder in the refusal ("cmtkd train"). The holder deletes the lock file when
    it releases it, so a finished run directory holds only results; a process that locked a file
    already deleted (it lost that race) sees another inode at the path and tries again."""

    def __init__(self, directory: str | Path, what: str = "cmtkd train"):
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        while self.fd is None:
            try:
                # O_NOFOLLOW: a lock file that is a symbolic link would have us truncate and write its target.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, _FILE_MODE)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UserError(f"{self.path} is a symbolic link; cmtkd only locks a plain file it creates "
                                    f"itself: delete it") from None
                raise os_error(self.path.parent, exc, action="write into") from None
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a hard link: writing it writes another file
                os.close(fd)
                raise UserError(f"{self.path} is not a plain file of its own (a link or special file); delete it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                raise RunBusy(f"{self.path.parent} is in use by another {holder or 'cmtkd process'}; wait for it "
                              f"to finish or choose another --out") from None
            except OSError as exc:
                os.close(fd)
                raise os_error(self.path, exc, action="lock") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:  # released and deleted between our open and flock
                os.close(fd)
                continue
            self.fd = fd
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{self.what} (pid {os.getpid()})\n".encode(), 0)
        except OSError:
            pass  # the holder's name is a courtesy; the lock itself is held
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # e.g. a directory made read-only meanwhile
            self.path.unlink(missing_ok=True)  # while still locked: see the class docstring
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class YamlRefused(Exception):
    """A YAML document that parses but that cmtkd refuses: a key repeated in one mapping, or an anchor
    or alias."""


@functools.cache
def _strict_yaml_loader():
    """PyYAML's SafeLoader, stricter: a key repeated in one mapping is an error (SafeLoader keeps the
    last silently), and anchors/aliases are refused, so a few lines cannot expand into gigabytes (an
    "alias bomb"); cmtkd's configs use neither. Built on first use: importing this module needs no YAML."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise YamlRefused(f"YAML anchors and aliases (&name, *name) are not supported (line "
                                  f"{event.start_mark.line + 1}); write the values out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges, resolved by SafeLoader itself
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if repeated:
                    raise YamlRefused(f"key {key!r} appears twice in one mapping (line "
                                      f"{key_node.start_mark.line + 1}); keep one")
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def load_yaml_text(text: str):
    """``yaml.safe_load(text)``, but a repeated key or an anchor/alias raises :class:`YamlRefused`
    (invalid YAML raises ``yaml.YAMLError`` as before)."""
    loader = _strict_yaml_loader()(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# A config file is a few KB; 1 MiB is far above any real one and bounds what a YAML file can make us read.
MAX_CONFIG_BYTES = 2**20


def yaml_error_line(exc) -> str:
    """``yaml.YAMLError`` -> "line N: what" (its first line), for one-line messages."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {what}" if mark is not None else what


def read_yaml_mapping(path: str | Path, what: str, missing: str, not_mapping: str) -> dict:
    """The mapping a YAML file holds (an empty file is ``{}``), read as strictly as cmtkd reads every
    config (library and workflow alike): a regular file of at most :data:`MAX_CONFIG_BYTES`, UTF-8, no
    repeated key, no anchor/alias. ``what`` names the file in the one-line error for each of those (with
    the line where there is one); ``missing`` and ``not_mapping`` are the whole errors for those cases."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        text = read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                        f"save it as UTF-8") from None
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise UserError(f"{what} {path} is {path.stat().st_size:,} bytes, more than a config file can be "
                            f"({MAX_CONFIG_BYTES:,}); give the right file") from None
        raise UserError(f"cannot read {what} {path} ({exc.strerror or exc}); fix the cause and rerun") from None
    try:
        data = load_yaml_text(text) or {}
    except YamlRefused as exc:
        raise UserError(f"{what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML ({yaml_error_line(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(not_mapping)
    return data


def ensure_writable_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=f".write-test{TEMP_MARKER}", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to output directory {path} ({exc.strerror}); choose another --out") from None
    return path
