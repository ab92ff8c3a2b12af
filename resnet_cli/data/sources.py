"""Where images come from: torchvision's dataset classes, read once into memory.

Dataset files are found (or downloaded and checksummed) by torchvision. A root that is
read-only and holds only the official .gz files (how a shared data folder looks) is mirrored
into a writable cache and extracted there, never into the root itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import DataError, first_line


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a torchvision dataset that the rest of the code needs."""

    folder: str  # torchvision's folder under root
    files: tuple[str, ...]  # extracted files, in folder: what torchvision reads
    archives: tuple[str, ...]  # the official downloads, relative to root
    channels: int
    num_classes: int
    train_images: int  # lets data.val_size be checked before anything is read


# MNIST-family facts mirror torchvision's `resources`; CIFAR's its tarball layout.
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo("FashionMNIST/raw", _MNIST_FILES,
                                 tuple(f"FashionMNIST/raw/{f}.gz" for f in _MNIST_FILES), 1, 10, 60_000),
    "mnist": DatasetInfo("MNIST/raw", _MNIST_FILES, tuple(f"MNIST/raw/{f}.gz" for f in _MNIST_FILES), 1, 10, 60_000),
    "cifar10": DatasetInfo("cifar-10-batches-py", ("data_batch_1", "test_batch", "batches.meta"),
                           ("cifar-10-python.tar.gz",), 3, 10, 50_000),
    "cifar100": DatasetInfo("cifar-100-python", ("train", "test", "meta"), ("cifar-100-python.tar.gz",), 3, 100,
                            50_000),
}


def _torchvision_class(name: str):
    from torchvision import datasets

    return {"fashion_mnist": datasets.FashionMNIST, "mnist": datasets.MNIST,
            "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resnet-cli" / "data"


def _writable(path: Path) -> bool:
    probe = path
    while not probe.exists():
        probe = probe.parent
    # Write bits too, not only access(): root may write anywhere, but a folder that was made
    # read-only on purpose (a shared data folder) is still not ours to extract into.
    return os.access(probe, os.W_OK) and bool(probe.stat().st_mode & 0o222)


def _extracted(root: Path, info: DatasetInfo) -> bool:
    return all((root / info.folder / f).exists() for f in info.files)


def _archived(root: Path, info: DatasetInfo) -> bool:
    return all((root / f).exists() for f in info.archives)


def _mirror_archives(root: Path, cache: Path, info: DatasetInfo) -> Path:
    """Copy the compressed files into the cache, where torchvision may verify and extract them."""
    for f in info.archives:
        dst = cache / f
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.part")
            shutil.copyfile(root / f, tmp)
            os.replace(tmp, dst)
    return cache


def open_torchvision(name: str, root: str | os.PathLike, download: bool,
                     cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(train, test) torchvision datasets, without transforms."""
    info = DATASETS[name]
    root = Path(root).expanduser().resolve()
    cls = _torchvision_class(name)
    cache = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir().resolve()
    if _extracted(root, info):
        return _open_extracted(cls, root, root, name, info)
    archived = _archived(root, info)
    if not archived and not download:
        raise _not_found(name, root, info, "and data.download=false", download)
    # torchvision's download() finds archives already there, checks their MD5 and extracts them
    # beside themselves (no network): in place if we may write there, else in the cache (a
    # read-only root's archives are mirrored there first).
    target = root if _writable((root / info.archives[0]).parent if archived else root) else cache
    if target == cache and _extracted(cache, info):  # extracted by an earlier run
        return _open_extracted(cls, cache, root, name, info)
    with _one_writer(target):
        use_root = _mirror_archives(root, cache, info) if archived and target == cache else target
        new_paths = _not_yet_there(use_root, info)
        try:
            train = cls(str(use_root), train=True, download=True)
            test = cls(str(use_root), train=False, download=True)
        except BaseException as e:
            # torchvision makes its folders before it downloads: a failed (or interrupted) attempt
            # would leave empty folders, even a whole new root, and partial files behind.
            _remove_new(new_paths)
            if isinstance(e, (OSError, RuntimeError)):  # URLError is an OSError; MD5 and mirrors: RuntimeError
                raise _not_found(name, root, info, f"and the download failed ({download_failure(e, cls)})",
                                 download) from None
            raise
    return train, test


# What torchvision's readers raise for a file cut short or not of its format: torch's reshape
# (RuntimeError), its header checks (AssertionError; KeyError under python -O), a wrong type
# byte (TypeError), an unreadable file (OSError).
_UNREADABLE = (OSError, RuntimeError, ValueError, AssertionError, KeyError, TypeError)


def _open_extracted(cls: Any, folder: Path, root: Path, name: str, info: DatasetInfo) -> tuple[Any, Any]:
    """Both splits from files already extracted in `folder`, read without the lock. A file that
    fails may be one another process is still writing (torchvision writes them in place): read
    again once that process is done, and only then call them unreadable."""
    def read() -> tuple[Any, Any]:
        return cls(str(folder), train=True, download=False), cls(str(folder), train=False, download=False)

    try:
        return read()
    except _UNREADABLE:
        pass
    with _one_writer(folder):
        try:
            return read()
        except PermissionError as e:
            raise DataError(f"data.root={root}: cannot read {e.filename or folder} (permission denied)") from None
        except _UNREADABLE as e:
            raise DataError(f"data.root={root}: the {name} files in {folder / info.folder}/ cannot be read "
                            f"({type(e).__name__}: {first_line(e)}); remove them (the official archives can stay) "
                            "and they are extracted or downloaded again") from None


def _lock_file(folder: Path) -> int | None:
    """An open descriptor of the lock file for `folder` in the temp folder, made readable and
    writable by all so that users sharing a data folder share its lock; None if it cannot be
    had (the caller goes on unlocked, as before locks existed)."""
    path = Path(tempfile.gettempdir()) / f"resnet-cli-data-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.lock"
    for _ in range(3):
        try:  # an existing file without O_CREAT: fs.protected_regular refuses O_CREAT on another user's
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            pass
        except OSError:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # made by another process meanwhile: open that one
            continue
        except OSError:
            return None
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)  # past the umask
        return fd
    return None


@contextlib.contextmanager
def _one_writer(folder: Path) -> Iterator[None]:
    """One process at a time downloads or extracts into `folder`. torchrun's ranks and a
    parallel sweep's jobs all open the data at once; on a fresh machine each would write the
    same files, and one could read another's half-written file. The lock is a file in the temp
    folder named after `folder` (nothing is added to the data folder), held with flock, which
    the OS releases if the process dies. It excludes processes of one machine that share a
    temp folder; where flock is missing (Windows) or refused (some network file systems),
    there is no lock."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    fd = _lock_file(folder) if fcntl is not None else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"data: another process is writing dataset files into {folder}; waiting for it",
                      file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # ENOLCK, EOPNOTSUPP: a temp folder on a file system without flock
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _not_yet_there(root: Path, info: DatasetInfo) -> list[Path]:
    """The files and folders (root and its parents included) that a download into `root` may
    create and that do not exist now."""
    made = [root / f for f in info.archives] + [root / info.folder / f for f in info.files]
    return sorted({q for p in made for q in (p, *p.parents) if not q.exists()})


def _remove_new(paths: list[Path]) -> None:
    """Empty files first, then folders deepest first (rmdir removes only empty ones). A file
    with data stays: another process (a sweep job, a torchrun rank) downloading into the same
    root may have just finished it, and a partial one is downloaded again next time anyway
    (torchvision checks each archive's MD5)."""
    for p in paths:
        if p.is_file() and p.stat().st_size == 0:
            with contextlib.suppress(OSError):
                p.unlink()
    for p in sorted((p for p in paths if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            p.rmdir()


# torchvision's MNIST family tries each mirror and raises one RuntimeError that lists them:
# "Error downloading FILE:\nTried MIRROR, got:\nERROR\nTried ...".
_TRIED = re.compile(r"^Tried (\S+), got:\n(.*?)(?=\nTried \S+, got:\n|\n*\Z)", re.M | re.S)
_URLOPEN = re.compile(r"^<urlopen error (.*)>$", re.S)


def download_failure(e: BaseException, cls: Any = None) -> str:
    """Why a torchvision download failed, in one line: the URL and the network's or the server's
    answer (torchvision keeps those on later lines or inside a URLError)."""
    text = str(e)
    tried = _TRIED.findall(text)
    if tried:
        filename = re.match(r"Error downloading (\S+?):?\n", text)
        failures = [(f"{mirror}{filename.group(1) if filename else ''}", _reason_text(err)) for mirror, err in tried]
        # A mirror that answers with an HTTP status is usually a dead fallback (yann.lecun.com
        # refuses robots); a file that arrived damaged, or the network failing, says more.
        rank = {"other": 0, "network": 1, "http": 2}
        url, (_, reason) = min(failures, key=lambda f: rank[f[1][0]])
        others = {0: "", 1: "; the other mirror failed too"}.get(len(failures) - 1,
                                                                  f"; {len(failures) - 1} other mirrors failed too")
        return f"{url}: {reason}{others}"
    if isinstance(e, urllib.error.URLError):
        url = getattr(cls, "url", None) if cls is not None else None
        return (f"{url}: " if url else "") + _url_error(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return _reason_text(text)[1] if text.strip() else type(e).__name__


def _url_error(e: urllib.error.URLError) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP Error {e.code}: {e.reason}"
    reason = e.reason
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _reason_text(err: str) -> tuple[str, str]:
    """(kind, reason) from the text of one failed download; kind is network, http or other."""
    err = err.strip()
    m = _URLOPEN.match(err)
    if m:  # "<urlopen error [Errno -2] Name or service not known>"
        return "network", re.sub(r"^\[Errno -?\d+\] ", "", m.group(1).strip()) or "network error"
    if err.startswith("HTTP Error"):
        return "http", err.splitlines()[0][:120]
    if err == "File not found or corrupted.":  # download_url's MD5 check, after the file arrived
        return "other", "the downloaded file failed its MD5 check"
    return "other", (err.splitlines() or ["unknown error"])[0][:160]


def _not_found(name: str, root: Path, info: DatasetInfo, why: str, download: bool) -> DataError:
    files = ", ".join(info.archives)
    # With data.download=true already on, the download is what failed: only the files help.
    advice = ("put the official files there, set data.root= (or RESNET_CLI_DATA) to a folder that has them, "
              "or allow data.download=true on a machine with internet") if not download else \
        ("copy the official files there (downloaded where there is internet), or set data.root= "
         "(or RESNET_CLI_DATA) to a folder that has them")
    return DataError(f"data.root={root}: {name} files not found (expected {files} under it) {why}; {advice}")


def check_available(name: str, root: str, download: bool) -> None:
    """Cheap check before a run starts: fail now if the files are missing and may not be fetched."""
    if name in DATASETS and not download:
        info = DATASETS[name]
        path = Path(root).expanduser().resolve()
        if not (_extracted(path, info) or _archived(path, info)):
            raise _not_found(name, path, info, "and data.download=false", download)
    if name == "imagefolder":
        path = Path(root).expanduser().resolve()
        for split in ("train", "val"):
            if not (path / split).is_dir():
                raise DataError(f"data.root={path}: imagefolder needs {path / split}/ with one folder per class")


def as_uint8_nchw(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as one uint8 N x C x H x W tensor and labels as int64, from a torchvision dataset."""
    data = ds.data
    images = torch.as_tensor(data)
    if images.ndim == 3:  # MNIST family: N x H x W
        images = images.unsqueeze(1)
    else:  # CIFAR: N x H x W x C numpy
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return images.contiguous(), labels


def synthetic(n: int, channels: int, size: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images with a faint class-dependent pattern, so that a smoke run can learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    patterns = torch.rand(num_classes, channels, size, size, generator=g)
    noise = torch.rand(n, channels, size, size, generator=g)
    images = (0.7 * patterns[labels] + 0.3 * noise) * 255
    return images.round().to(torch.uint8), labels
