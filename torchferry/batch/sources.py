"""Which images a batch run reads: every image file under a folder or a bucket prefix, or the paths a list file
names, through pyarrow's file systems (the layer Ray Data reads with): a local path, `file://`, `s3://`, `gs://`.

The listing is done once, on the driver, with each file's size: a file over the size limit is recorded as bad
without being read, a listed path that is missing is recorded as bad, and a resumed run leaves out what its
output already holds before any image is read.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from torchferry.cli import lead_line
from torchferry.contract import TorchferryError

# The server's formats (torchferry.serve.images.ALLOWED_FORMATS) by their usual file extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Entry:
    """One file to score: its path on `Source.fs` and its size in bytes (None when it does not exist)."""

    path: str
    size: int | None


@dataclass
class Source:
    """Files on one file system: `prefix` + a path is how the output names a file (`s3://bucket/key`)."""

    fs: object  # pyarrow.fs.FileSystem
    prefix: str
    entries: list[Entry]

    def shown(self, path: str) -> str:
        """How the output names the file at `path` on `fs`."""
        return self.prefix + path


def filesystem(location: str) -> tuple[object, str, str]:
    """(pyarrow file system, path on it, prefix that makes a path a URI again) for a local path or a URI."""
    from pyarrow import fs as pafs

    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location)), ""
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except Exception as exc:  # noqa: BLE001 - pyarrow's ArrowInvalid, OSError ...: a bad or unsupported URI
        raise TorchferryError(f"cannot open {location!r}: {lead_line(exc)} (local paths, "
                              "file://, s3:// and gs:// are read)") from None
    scheme = location.split("://", 1)[0].lower()
    return fs, path, "" if scheme == "file" else f"{scheme}://"


def _is_image(path: str, extensions: tuple[str, ...]) -> bool:
    return not extensions or os.path.splitext(path)[1].lower() in extensions


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def list_local_folder(root: str, extensions: tuple[str, ...]) -> list[Entry]:
    """`list_folder` on the local file system: symlinked folders followed, each real folder once (pyarrow's listing
    follows a link to `..` forty levels deep, two such links 2**40 paths: it never ended), regular files only."""
    seen, entries = set(), []
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in files:
            path = os.path.join(dirpath, name)
            if name.startswith(".") or not _is_image(path, extensions):
                continue
            try:
                st = os.stat(path)
            except OSError:  # a dangling link
                continue
            if stat.S_ISREG(st.st_mode):  # not a FIFO or device named like an image
                entries.append(Entry(path, st.st_size))
    return sorted(entries, key=lambda e: e.path)


def list_folder(fs, root: str, extensions: tuple[str, ...]) -> list[Entry]:
    """Every file under `root` (recursively) whose extension is one of `extensions` (all, when empty), hidden
    files and folders left out, sorted by path."""
    from pyarrow import fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return list_local_folder(root, extensions)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    base = root.rstrip("/") + "/"
    entries = [Entry(i.path, i.size) for i in infos if i.type == pafs.FileType.File
               and _is_image(i.path, extensions) and not _hidden(i.path.removeprefix(base))]
    return sorted(entries, key=lambda e: e.path)


def read_list(fs, path: str, prefix: str) -> list[str]:
    """The paths a list file names, one a line (blank lines and `#` comments left out); a relative path is taken
    relative to the list file's folder, and every path must be on the list file's own file system. Each path once."""
    with fs.open_input_stream(path) as f:
        text = f.read().decode("utf-8", errors="replace")
    folder, paths = os.path.dirname(path), []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line:
            scheme, rest = line.split("://", 1)
            if f"{scheme.lower()}://" != (prefix or "file://"):
                raise TorchferryError(f"{prefix}{path} line {number}: {line!r} is on another file system than the "
                                      "list file; one run reads from one file system")
            paths.append(rest)
        else:
            paths.append(line if line.startswith("/") and not prefix else os.path.normpath(os.path.join(folder, line)))
    return list(dict.fromkeys(paths))


def stat_paths(fs, paths: list[str]) -> list[Entry]:
    """Each path with its size; None for a path that is missing or is not a file."""
    from pyarrow import fs as pafs

    infos = fs.get_file_info(paths) if paths else []
    return [Entry(p, i.size if i.type == pafs.FileType.File else None) for p, i in zip(paths, infos)]


def resolve(location: str, extensions: tuple[str, ...]) -> Source:
    """The files `location` names: a folder or prefix (its image files), or a list file (the paths in it)."""
    from pyarrow import fs as pafs

    fs, path, prefix = filesystem(location)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            return Source(fs, prefix, list_folder(fs, path, extensions))
        if info.type == pafs.FileType.File:
            return Source(fs, prefix, stat_paths(fs, read_list(fs, path, prefix)))
    except (OSError, ValueError) as exc:  # permissions, credentials, a bucket that does not exist ...
        raise TorchferryError(f"cannot read {location!r}: {str(exc).strip().splitlines()[0][:300]}") from None
    raise TorchferryError(f"--input {location!r} does not exist; give a folder, a bucket prefix (s3://, gs://) or "
                          "a list file with one image path a line")
