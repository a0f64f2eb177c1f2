"""Asynchronous direct file I/O: the Python facade over the native engine in csrc/.

Files are opened for O_DIRECT; every read and write returns an IoFuture with done() and wait().
Two backends move the bytes: io_uring (driven through raw system calls, with pool memory
registered as fixed buffers) and a pread/pwrite thread pool, chosen automatically where the
kernel or a sandbox refuses io_uring, or by ``OFFLOAD_IO_BACKEND=io_uring|threads``.

    engine = offload.io.Engine()
    with offload.io.open(path, "w", engine=engine) as f:
        f.write_from(lease, 0).wait()
"""

from offload.io.engine import Engine, default_engine
from offload.io.file import DirectFile, open
from offload.io.future import IoFuture, wait_all
from offload.io.probe import DirectCheck, UringStatus, check_direct, probe
from offload.io.request import Read, Write

__all__ = [
    "DirectCheck",
    "DirectFile",
    "Engine",
    "IoFuture",
    "Read",
    "UringStatus",
    "Write",
    "check_direct",
    "default_engine",
    "open",
    "probe",
    "wait_all",
]
