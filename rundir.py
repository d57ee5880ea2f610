"""The run folder (out_dir): one run at a time in it, an earlier run replaced only once the new one has proved itself,
and one history after a resume.

- one_run: an OS lock on out_dir/.lock for the run's whole life (rank 0 under torchrun). The kernel drops it when
  the process ends, however it ends, so there is never a stale lock; a second run into the folder fails at once,
  naming the process that holds it.
- claim / set_aside / settle / restore: a fresh run needs a folder free of an earlier run's files, unless
  --overwrite. Those files are not deleted up front: after every check that needs no weights has passed they are
  moved into out_dir/.replaced (set_aside), deleted when the new run writes its first checkpoint (settle), and moved
  back if it fails before that (restore). A run killed in between leaves them in .replaced, said at the next start.
- one_history: on resume, log.jsonl keeps the records up to the checkpoint's step only (the steps after it are
  trained again), rewritten atomically.
"""

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from atomic import lock, temp_beside

RUN_FILES = ("lora.safetensors", "transformer", "log.jsonl", "checkpoints", "validation", "tb")  # what a run
# writes (transformer/: train.mode full's result; cache/ is content-keyed and shared, so it is kept)
SET_ASIDE = RUN_FILES + ("config.json",)  # --overwrite also moves the earlier run's config.json
REPLACED = ".replaced"


@contextlib.contextmanager
def one_run(out_dir: Path, hold: bool = True):
    """Hold out_dir/.lock for the block (`hold` False: ranks other than 0, which write nothing there first)."""
    if not hold:
        yield
        return
    f, holder = lock(Path(out_dir) / ".lock", blocking=False)
    if f is None:
        raise ValueError(f"out_dir {str(out_dir)!r} is in use by another run ({holder or 'a process'}); wait for it "
                         f"to end, or use another --out-dir")
    with f:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)}\n")
        f.flush()
        yield


def earlier_run(out_dir: Path) -> list[str]:
    return [n for n in RUN_FILES if (Path(out_dir) / n).exists()]


def claim(out_dir: Path, resume: str, overwrite: bool) -> list[str]:
    """The run-folder rule, checked before any work and changing nothing: a fresh run needs an out_dir free of an
    earlier run's files unless `overwrite`; a resumed run continues in place. Why: the old run's checkpoints would
    otherwise outrank the new run's in pruning, its lora.safetensors be overwritten and its log appended to.
    Leftovers of interrupted checkpoint writes (.tmp-*) are removed. Returns notes for the log."""
    out_dir, notes = Path(out_dir), []
    earlier = earlier_run(out_dir)
    kept = out_dir / REPLACED
    if earlier and not resume and not overwrite:
        raise ValueError(f"out_dir {str(out_dir)!r} holds an earlier run ({', '.join(earlier)}): pass --resume latest "
                         f"to continue it, --overwrite to replace it, or another --out-dir")
    if kept.exists():
        notes.append(f"note: {kept} holds a run that an --overwrite replaced before the new run could write a "
                     f"checkpoint; it is kept until a run in this folder writes one (move its files back to restore "
                     f"it)")
    for tmp in sorted((out_dir / "checkpoints").glob(".tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        notes.append(f"removed {tmp} (an interrupted checkpoint write)")
    return notes


def set_aside(out_dir: Path) -> str | None:
    """--overwrite, once every check has passed: move the earlier run's files into out_dir/.replaced (a rename each:
    nothing is copied or deleted). If .replaced already holds a run (a replacement killed before its first
    checkpoint), that one is kept and the files now in the folder, that killed run's, are deleted instead."""
    out_dir = Path(out_dir)
    here = [n for n in SET_ASIDE if (out_dir / n).exists()]
    if not here:
        return None
    kept = out_dir / REPLACED
    if kept.exists():
        for n in here:
            p = out_dir / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return (f"--overwrite: deleted {', '.join(here)} (a run that never wrote a checkpoint); the run before it "
                f"stays in {kept}")
    kept.mkdir()
    for n in here:
        os.replace(out_dir / n, kept / n)
    return (f"--overwrite: the earlier run's {', '.join(here)} moved to {kept}; deleted once this run writes its "
            f"first checkpoint, moved back if it fails before")


def settle(out_dir: Path) -> str | None:
    """The new run has a checkpoint: the replaced run goes."""
    kept = Path(out_dir) / REPLACED
    if not kept.exists():
        return None
    shutil.rmtree(kept)
    return f"deleted the replaced run ({kept})"


def restore(out_dir: Path) -> str | None:
    """The new run failed before its first checkpoint: its files go and the replaced run comes back."""
    out_dir, kept = Path(out_dir), Path(out_dir) / REPLACED
    if not kept.exists():
        return None
    for n in SET_ASIDE:
        p = out_dir / n
        if p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in kept.iterdir():
        os.replace(p, out_dir / p.name)
    kept.rmdir()
    return f"restored the earlier run in {out_dir} (this run failed before writing a checkpoint)"


def one_history(log: Path, step: int) -> int:
    """Keep log.jsonl's records with "step" <= `step` (a resume from that checkpoint trains the later ones again);
    a torn last line (a kill mid-write) goes too. Returns how many records were dropped."""
    if not log.is_file():
        return 0
    kept, dropped = [], 0
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        fd, tmp = temp_beside(log)
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, log)
    return dropped
