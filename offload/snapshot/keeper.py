"""The snapshot keeper: one process per node that owns the shared memory holding the node's snapshots.

Trainers come and go (a crash, a preemption, a restart by torchrun); the keeper outlives them, so
a restarted trainer finds its last snapshot in memory. It is a small server on a Unix socket in a
per-user directory (``runtime_dir``), speaking one JSON object per message (SOCK_SEQPACKET keeps
message boundaries and carries file descriptors):

- ``{"op": "segment", "job", "rank", "slot", "nbytes"}``: the segment of (job, rank, buffer slot),
  made or resized to nbytes; the reply carries its file descriptor (SCM_RIGHTS).
- ``{"op": "open", "job", "rank", "slot"}``: the existing segment's descriptor, or ``missing``.
- ``{"op": "list"}``: every segment with its header (segment.py), for ``offload snapshot status``.
- ``{"op": "drop", "job"}`` frees a job's segments; ``{"op": "stop"}`` ends the keeper.

Segments are memfds (``memfd_create``): anonymous shared memory, like a file in /dev/shm but with
no name another process could open and no size cap of the /dev/shm mount (64 MiB in a default
Docker container). The trainer maps the descriptor and writes its snapshot there itself; the keeper
only owns the lifetime. A segment's memory goes when the keeper closes it and no trainer maps it:
a keeper killed with its trainer takes the node's snapshots with it, as a lost node would, and
nothing is left behind in /dev/shm after any crash.

Security: the directory is made mode 0700 and must be owned by the user (else refused), the
socket is mode 0600, and every peer's uid is checked with SO_PEERCRED: the keeper serves only the
user who started it (the client checks the keeper's uid the same way).

Lifetime: started detached by the first trainer of the node that finds none (client.py: a new
session, then a fork, so it is nobody's child and no signal to the trainer's process group reaches
it); one keeper per directory (an flock on ``keeper.lock``); it ends on ``stop``, on SIGTERM, or
after ``idle_timeout`` seconds with no trainer connected. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offload._version import __version__
from offload.snapshot import segment

SOCKET = "keeper.sock"
LOCK = "keeper.lock"
PIDFILE = "keeper.pid"
MAX_MESSAGE = 1 << 20
DEFAULT_IDLE_TIMEOUT = 3600.0
_JOB = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class KeeperError(RuntimeError):
    """A keeper that cannot start or be reached, or that refused a request."""


def runtime_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The keeper's directory: path, else $OFFLOAD_SNAPSHOT_DIR, else /dev/shm/offload-<uid>
    (/tmp/offload-<uid> where there is no /dev/shm)."""
    if path is not None:
        return Path(path)
    env = os.environ.get("OFFLOAD_SNAPSHOT_DIR")
    if env:
        return Path(env)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    return base / f"offload-{os.getuid()}"


def secure_dir(path: Path) -> Path:
    """Makes path (mode 0700) or checks that it is a directory of this user that no one else can enter."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        raise KeeperError(f"snapshot keeper directory {path} is not a directory")
    if st.st_uid != os.getuid():
        raise KeeperError(
            f"snapshot keeper directory {path} belongs to uid {st.st_uid}, not to this user "
            f"(uid {os.getuid()}): choose another with snapshot dir= or OFFLOAD_SNAPSHOT_DIR"
        )
    if st.st_mode & 0o077:
        raise KeeperError(
            f"snapshot keeper directory {path} has mode {oct(st.st_mode & 0o777)}: other users could "
            f"reach the keeper; make it 0700 (chmod 700 {path})"
        )
    return path


def peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return int(uid)


@dataclass(slots=True)
class _Segment:
    fd: int
    nbytes: int


class Keeper:
    """The server. ``bind()`` takes the directory (False: another keeper has it), ``serve()`` runs."""

    def __init__(
        self, path: Path, idle_timeout: float = DEFAULT_IDLE_TIMEOUT, uid: int | None = None
    ) -> None:
        self.dir = path
        self.idle_timeout = idle_timeout
        self.uid = os.getuid() if uid is None else uid  # the one user served (tests pass another)
        self.segments: dict[tuple[str, int, int], _Segment] = {}
        self.listener: socket.socket | None = None
        self._lock_fd = -1
        self._stop = False

    def bind(self) -> bool:
        secure_dir(self.dir)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False  # another keeper serves this directory
            raise
        self._lock_fd = fd
        path = self.dir / SOCKET
        path.unlink(missing_ok=True)  # a socket left by a keeper that died: we hold the lock now
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # the socket is created mode 0600
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(64)
        self.listener = sock
        return True

    def serve(self) -> None:
        assert self.listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        clients = 0
        idle_since = time.monotonic()
        try:
            self._loop(sel, clients, idle_since)
        finally:
            sel.close()
            self.close()

    def _loop(self, sel: selectors.BaseSelector, clients: int, idle_since: float) -> None:
        assert self.listener is not None
        while not self._stop:
            timeout = max(0.0, idle_since + self.idle_timeout - time.monotonic()) if clients == 0 else None
            events = sel.select(timeout)
            if not events and clients == 0 and time.monotonic() - idle_since >= self.idle_timeout:
                break
            for key, _ in events:
                if key.fileobj is self.listener:
                    conn, _ = self.listener.accept()
                    if self._admit(conn):
                        sel.register(conn, selectors.EVENT_READ, None)
                        clients += 1
                    continue
                client = key.fileobj
                assert isinstance(client, socket.socket)
                if not self._serve_one(client):
                    sel.unregister(client)
                    client.close()
                    clients -= 1
                    if clients == 0:
                        idle_since = time.monotonic()

    def close(self) -> None:
        for seg in self.segments.values():
            os.close(seg.fd)
        self.segments.clear()
        if self.listener is not None:
            with contextlib.suppress(OSError):
                (self.dir / SOCKET).unlink()
            self.listener.close()
            self.listener = None
        pidfile = self.dir / PIDFILE
        with contextlib.suppress(OSError, ValueError):
            if int(pidfile.read_text()) == os.getpid():
                pidfile.unlink()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _admit(self, conn: socket.socket) -> bool:
        uid = peer_uid(conn)
        if uid == self.uid:
            return True
        msg = f"refused: this snapshot keeper serves uid {self.uid} only, the peer is uid {uid}"
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"ok": False, "error": msg}).encode())
        conn.close()
        return False

    def _serve_one(self, conn: socket.socket) -> bool:
        """Answers one request; False when the client is gone."""
        try:
            raw = conn.recv(MAX_MESSAGE)
        except OSError:
            return False
        if not raw:
            return False
        fds: list[int] = []
        try:
            req = json.loads(raw)
            reply, fds = self.handle(req)
        except (KeeperError, ValueError, KeyError, TypeError, OSError) as e:
            reply = {"ok": False, "error": str(e)}
        try:
            socket.send_fds(conn, [json.dumps(reply).encode()], fds)
        except OSError:
            return False
        return True

    def handle(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op = req.get("op")
        if op == "hello":
            return {
                "ok": True,
                "pid": os.getpid(),
                "uid": self.uid,
                "dir": str(self.dir),
                "version": __version__,
            }, []
        if op == "segment":
            key = _key(req)
            seg = self._make(key, int(req["nbytes"]))
            return {"ok": True, "nbytes": seg.nbytes}, [seg.fd]
        if op == "open":
            found = self.segments.get(_key(req))
            if found is None:
                return {"ok": False, "missing": True}, []
            return {"ok": True, "nbytes": found.nbytes}, [found.fd]
        if op == "list":
            return {"ok": True, "pid": os.getpid(), "segments": self._list()}, []
        if op == "drop":
            job = req["job"]
            for key in [k for k in self.segments if k[0] == job]:
                os.close(self.segments.pop(key).fd)
            return {"ok": True}, []
        if op == "stop":
            self._stop = True
            return {"ok": True}, []
        raise KeeperError(f"unknown request {op!r}")

    def _make(self, key: tuple[str, int, int], nbytes: int) -> _Segment:
        if nbytes < segment.HEADER_BYTES:
            raise KeeperError(f"a segment needs at least {segment.HEADER_BYTES} bytes, asked for {nbytes}")
        seg = self.segments.get(key)
        if seg is not None and seg.nbytes == nbytes:
            return seg
        fd = os.memfd_create(f"offload-snapshot:{key[0]}:{key[1]}:{key[2]}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)  # pages are taken as the trainer writes them
        except OSError:
            os.close(fd)
            raise
        if seg is not None:
            os.close(seg.fd)  # a trainer still mapping the old one keeps it until it unmaps
        self.segments[key] = seg = _Segment(fd, nbytes)
        return seg

    def _list(self) -> list[dict[str, Any]]:
        out = []
        for (job, rank, slot), seg in sorted(self.segments.items()):
            with mmap.mmap(seg.fd, segment.HEADER_BYTES, prot=mmap.PROT_READ) as mm:
                h = segment.read_header(mm)
            entry: dict[str, Any] = {"job": job, "rank": rank, "slot": slot, "nbytes": seg.nbytes}
            entry["header"] = None if h is None else h.to_json()
            out.append(entry)
        return out


def _key(req: dict[str, Any]) -> tuple[str, int, int]:
    job, rank, slot = req["job"], int(req["rank"]), int(req["slot"])
    if not isinstance(job, str) or not _JOB.match(job):
        raise KeeperError(f"snapshot job name {job!r}: use 1 to 64 letters, digits, '_', '.', '-'")
    if rank < 0 or slot < 0:
        raise KeeperError(f"rank {rank} and slot {slot} must be >= 0")
    return job, rank, slot


def _detach(path: Path) -> None:
    """Forks: the parent returns to its caller's exit (the starter sees the keeper ready, since the
    socket already listens), the child goes on with no terminal and no inherited output."""
    pid = os.fork()
    if pid > 0:
        (path / PIDFILE).write_text(f"{pid}\n")  # before the starter returns: it may read it at once
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m offload.snapshot.keeper", description=__doc__)
    p.add_argument("--dir", required=True, help="the keeper's directory (socket, lock, pid file)")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, help="seconds")
    p.add_argument("--foreground", action="store_true", help="do not detach")
    args = p.parse_args(argv)
    keeper = Keeper(Path(args.dir), args.idle_timeout)
    try:
        if not keeper.bind():
            return 0  # another keeper serves this directory: the starter connects to it
    except (KeeperError, OSError) as e:
        print(f"offload snapshot keeper: {e}", file=sys.stderr)
        return 1
    if not args.foreground:
        _detach(keeper.dir)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # serve() closes everything on the way out
    keeper.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
