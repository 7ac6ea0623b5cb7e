"""Wrapper for tests/test_distributed.py: runs a recipe as one rank of an `accelerate launch`, so that the test
can tell from the file system, not from Python's own `open()`, which rank wrote what in the run folder.

    accelerate launch ... tests/workers/rank_watch.py recipes/x.py --config ...

- Each rank marks what it creates, whoever writes it (Python, torch.save's C++ writer, safetensors' Rust
  writer, which writes a 0600 temporary file and renames it): the kernel gives every new file and folder the
  creating process's effective group, so as root (which may pick any group and still writes everywhere)
  rank N > 0 runs with group 43000 + N. Without root, the mark is the umask (rank 0: 022, others: 027, no
  world-read bit), which files created with an explicit mode (safetensors' 0600) do not show.
- Rank 0 watches the run folder with inotify and counts, per file, the closes after a write (IN_CLOSE_WRITE)
  and the renames onto it (IN_MOVED_TO), from any process. A non-main rank that rewrites a file rank 0
  created leaves no mark, but raises those counts. Every folder rank 0 makes (os.mkdir, which os.makedirs
  and Path.mkdir call) is watched before mkdir returns, so before rank 0 writes into it: none of rank 0's
  writes is missed.
- With $HF_TUNER_TEST_SIGINT = "RANK:STEP", that rank alone sends itself SIGINT during training step STEP
  (the others get no signal: they must stop at the same step through the recipes' all-reduce).

At exit each rank writes $HF_TUNER_WATCH_RECORD/rank<N>.json: its pid, its exit status, its mark, and (rank 0)
the counts, the folders watched from creation, and whether the kernel's event queue overflowed.
"""

import ctypes
import json
import os
import runpy
import select
import signal
import struct
import sys
import threading

IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_Q_OVERFLOW, IN_ISDIR = 0x8, 0x80, 0x100, 0x4000, 0x40000000

RANK = int(os.environ.get("RANK", "0"))
RECORD = os.environ["HF_TUNER_WATCH_RECORD"]
RANK_GID = 43000
os.umask(0o022 if RANK == 0 else 0o027)
if RANK and os.geteuid() == 0:
    os.setegid(RANK_GID + RANK)
MARK = {"gid": os.getegid(), "by": "gid" if os.geteuid() == 0 else "umask"}


class Watch:
    """inotify over a folder tree: write counts per relative path."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.dirs: dict[int, str] = {}  # watch descriptor -> relative folder
        self.from_creation: set[str] = set()
        self.late: set[str] = set()  # folders found by an event, not at their mkdir: writes before may be missed
        self.counts: dict[str, dict[str, int]] = {}  # path -> {"close_write": n, "moved_to": m}
        self.overflow = False
        self.lock = threading.Lock()
        self.stop = threading.Event()
        for folder, _, _ in os.walk(self.root):  # a resumed run's folder has checkpoints in it already
            self.add(folder, from_creation=True)
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def add(self, path: str, from_creation: bool) -> None:
        """Watch a folder; from_creation: before rank 0 writes into it (at its mkdir, or at the start)."""
        path = os.path.realpath(path)
        if not (path == self.root or path.startswith(self.root + os.sep)) or not os.path.isdir(path):
            return
        rel = os.path.relpath(path, self.root)
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        with self.lock:
            self.dirs[wd] = rel  # the same descriptor again when the folder is watched already
            (self.from_creation if from_creation else self.late).add(rel)

    def drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            off = 0
            while off < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, off)
                name = data[off + 16:off + 16 + length].split(b"\0", 1)[0].decode()
                off += 16 + length
                if mask & IN_Q_OVERFLOW:
                    self.overflow = True
                    continue
                folder = self.dirs.get(wd)
                if folder is None:
                    continue
                rel = os.path.normpath(os.path.join(folder, name))
                if mask & IN_ISDIR:
                    if mask & IN_CREATE:
                        self.add(os.path.join(self.root, rel), from_creation=False)  # a no-op if mkdir added it
                elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
                    kind = "close_write" if mask & IN_CLOSE_WRITE else "moved_to"
                    with self.lock:
                        seen = self.counts.setdefault(rel, {"close_write": 0, "moved_to": 0})
                        seen[kind] += 1

    def loop(self) -> None:
        while not self.stop.is_set():
            select.select([self.fd], [], [], 0.05)
            self.drain()

    def close(self) -> dict:
        self.stop.set()
        self.thread.join(timeout=5)
        self.drain()
        return {"counts": self.counts, "watched_from_creation": sorted(self.from_creation),
                "watched_late": sorted(self.late - self.from_creation), "overflow": self.overflow}


watch = None
if RANK == 0:
    watch = Watch(os.environ["HF_TUNER_WATCH_DIR"])
    _mkdir = os.mkdir

    def _watched_mkdir(path, *args, **kwargs):  # os.makedirs and Path.mkdir call os.mkdir too
        try:
            return _mkdir(path, *args, **kwargs)
        finally:
            if os.path.isdir(path):
                watch.add(os.fspath(path), from_creation=True)

    os.mkdir = _watched_mkdir

if os.environ.get("HF_TUNER_TEST_SIGINT"):
    who, step = map(int, os.environ["HF_TUNER_TEST_SIGINT"].split(":"))
    if who == RANK:
        from transformers import Trainer

        _training_step = Trainer.training_step

        def _signalling_step(self, *args, **kwargs):
            if self.state.global_step == step - 1 and not getattr(self, "_test_signalled", False):
                self._test_signalled = True
                signal.raise_signal(signal.SIGINT)  # the run's handler takes it: finish this step, save, stop
            return _training_step(self, *args, **kwargs)

        Trainer.training_step = _signalling_step


def _record(status) -> None:
    record = {"rank": RANK, "pid": os.getpid(), "exit_status": status, **MARK}
    if watch is not None:
        record.update(watch.close())
    os.makedirs(RECORD, exist_ok=True)
    with open(os.path.join(RECORD, f"rank{RANK}.json"), "w") as f:
        json.dump(record, f)


script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python recipes/x.py` would have it
status = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    raise
except BaseException:
    status = 1
    raise
finally:
    _record(status)
    # every rank's record is on disk before any rank exits: the launcher stops the other ranks (SIGTERM) as
    # soon as one exits with an error status, such as a stopped run's 130
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
