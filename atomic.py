"""Temp files and folders beside their target for atomic writes (write, fsync, rename), created with the mode a plain
open() / mkdir() would give under the user's umask. tempfile makes them 0600 / 0700 for safety in shared /tmp; here
they become the user's outputs (LoRAs, caches, the tiny checkpoint), which others on the machine may need to read."""

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it (Linux /proc; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temp file in path's folder, mode 0666 & ~umask; the caller writes, fsyncs and renames."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def user_mode(path) -> None:
    """chmod a file to what open() under the umask gives; for writers that recreate the temp file themselves
    (safetensors' save_file writes 0600 whatever the file was)."""
    os.chmod(path, 0o666 & ~umask())


def user_mode_tree(folder: Path) -> None:
    """user_mode for every file under `folder` and umask modes for its folders (a save_pretrained output)."""
    mask = umask()
    for d, dirs, files in os.walk(folder):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~mask)


def temp_dir_beside(path: Path) -> Path:
    """A new temp folder in path's folder, mode 0777 & ~umask, to be renamed to `path` once complete."""
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def lock(path: Path, blocking: bool) -> tuple[object, str] | tuple[None, str]:
    """An exclusive OS lock (flock) on `path`, created if needed: (the open file, which holds the lock until it is
    closed or the process dies: the kernel releases it, so a killed process leaves no stale lock, "") or, when
    `blocking` is False and another process holds it, (None, what that process wrote into the file)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        return None, holder
    return f, ""
