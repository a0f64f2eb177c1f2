"""The trainer's side of a snapshot keeper: connect (starting the node's keeper if there is none),
get segments, map them.

    client = KeeperClient.connect(dir)                  # the keeper of this node, started if needed
    seg = client.segment("job", rank, slot, nbytes)     # mapped shared memory, owned by the keeper
    seg.view()[...] = ...; seg.write_header(header)     # the header last: it commits the bytes

A segment is mapped here from the descriptor the keeper sends (keeper.py); the keeper keeps it
alive after this process dies. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import offload
from offload.snapshot import keeper, segment
from offload.snapshot.keeper import KeeperError, runtime_dir, secure_dir
from offload.snapshot.segment import Header

START_TIMEOUT = 60.0
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating zero


class Segment:
    """A keeper's segment mapped into this process (read-write, shared)."""

    def __init__(self, fd: int, nbytes: int) -> None:
        try:
            self.mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)  # the mapping keeps the memory; the keeper keeps its own descriptor
        self.nbytes = nbytes

    def view(self) -> memoryview:
        return memoryview(self.mm)

    def header(self) -> Header | None:
        return segment.read_header(self.mm)

    def write_header(self, h: Header) -> None:
        segment.write_header(self.mm, h)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still exported: the mapping goes with it
            self.mm.close()


class KeeperClient:
    """One connection to a keeper; requests are serialised (callers may be on several threads)."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.dir = path
        self._lock = threading.Lock()
        hello, _ = self.request("hello")
        self.pid = int(hello["pid"])

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        start: bool = True,
        idle_timeout: float = keeper.DEFAULT_IDLE_TIMEOUT,
    ) -> KeeperClient:
        """The keeper of directory path (runtime_dir's default when None); with start, one is
        started if none answers. Raises KeeperError naming the directory otherwise."""
        where = runtime_dir(path)
        if not start and not where.is_dir():
            raise KeeperError(f"no snapshot keeper is running in {where} (no such directory)")
        sock_path = str(where / keeper.SOCKET)
        if len(sock_path.encode()) > MAX_SOCKET_PATH:
            raise KeeperError(
                f"the keeper's socket {sock_path} is {len(sock_path.encode())} bytes long, more than a "
                f"Unix socket path may be ({MAX_SOCKET_PATH}): choose a shorter snapshot dir"
            )
        secure_dir(where)  # made, or checked: this user's alone
        sock = _try_connect(where)
        if sock is None and start:
            start_keeper(where, idle_timeout)
            sock = _try_connect(where)
        if sock is None:
            raise KeeperError(
                f"no snapshot keeper is running in {where}"
                + ("" if start else " (start one by taking a snapshot, or check the directory)")
            )
        uid = keeper.peer_uid(sock)
        if uid != os.getuid():
            sock.close()
            raise KeeperError(
                f"the snapshot keeper in {where} runs as uid {uid}, not as this user ({os.getuid()})"
            )
        return cls(sock, where)

    def request(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """One request and its reply (with any descriptors it carries); KeeperError on a refusal."""
        with self._lock:
            try:
                self.sock.send(json.dumps({"op": op, **fields}).encode())
                raw, fds, _, _ = socket.recv_fds(self.sock, keeper.MAX_MESSAGE, 4)
            except OSError as e:  # a keeper that refused us said why before it hung up
                raise KeeperError(
                    self._refusal() or f"the snapshot keeper in {self.dir} did not answer: {e}"
                ) from e
        if not raw:
            raise KeeperError(f"the snapshot keeper in {self.dir} closed the connection")
        reply = json.loads(raw)
        if not reply.get("ok") and not reply.get("missing"):
            for fd in fds:
                os.close(fd)
            raise KeeperError(f"snapshot keeper in {self.dir}: {reply.get('error')}")
        return reply, fds

    def _refusal(self) -> str | None:
        self.sock.settimeout(1.0)
        try:
            reason = json.loads(self.sock.recv(keeper.MAX_MESSAGE)).get("error")
        except (OSError, ValueError):
            return None
        return None if reason is None else f"snapshot keeper in {self.dir}: {reason}"

    def segment(self, job: str, rank: int, slot: int, nbytes: int) -> Segment:
        """The segment of (job, rank, slot), nbytes long (a new, zeroed one if its size changed)."""
        reply, fds = self.request("segment", job=job, rank=rank, slot=slot, nbytes=nbytes)
        return Segment(fds[0], int(reply["nbytes"]))

    def open(self, job: str, rank: int, slot: int) -> Segment | None:
        reply, fds = self.request("open", job=job, rank=rank, slot=slot)
        if reply.get("missing"):
            return None
        return Segment(fds[0], int(reply["nbytes"]))

    def list(self) -> list[dict[str, Any]]:
        """Every segment the keeper holds: job, rank, slot, nbytes and header (None: empty)."""
        return list(self.request("list")[0]["segments"])

    def drop(self, job: str) -> None:
        self.request("drop", job=job)

    def stop(self) -> None:
        """Ends the keeper (its segments go with it, once no trainer maps them)."""
        self.request("stop")
        self.close()

    def close(self) -> None:
        self.sock.close()


def _try_connect(where: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(str(where / keeper.SOCKET))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def start_keeper(where: Path, idle_timeout: float) -> None:
    """Starts the keeper of directory where, detached (a new session, then keeper.py forks): it is
    nobody's child and outlives this process. Returns once it listens, or raises KeeperError with
    what it printed. Two ranks starting one at once is fine: the second finds the lock taken."""
    env = dict(os.environ)
    src = str(Path(offload.__file__).resolve().parents[1])  # the same offload as this process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "offload.snapshot.keeper", "--dir", str(where)]
    cmd += ["--idle-timeout", str(idle_timeout)]
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            timeout=START_TIMEOUT,
            text=True,
        )
    except subprocess.TimeoutExpired as e:
        raise KeeperError(f"the snapshot keeper in {where} did not start within {START_TIMEOUT:.0f} s") from e
    if proc.returncode != 0:
        raise KeeperError(f"the snapshot keeper in {where} could not start: {proc.stderr.strip()}")
    deadline = time.monotonic() + START_TIMEOUT
    while not (where / keeper.SOCKET).exists():  # another starter's keeper may still be binding
        if time.monotonic() > deadline:
            raise KeeperError(f"the snapshot keeper in {where} did not start within {START_TIMEOUT:.0f} s")
        time.sleep(0.01)
