"""Background threads (the checkpoint writer's) run at a lower CPU priority than training."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from offload.checkpoint.staging import ALIGN, Staging
from offload.utils import priority
from offload.utils.priority import BACKGROUND_NICE, MAX_NICE, lower_thread_priority, thread_nice
from tests.models import tiny

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")


def in_thread(fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def expected() -> int:
    return min(MAX_NICE, thread_nice() + BACKGROUND_NICE)


def test_a_background_thread_runs_below_the_main_thread():
    main = thread_nice()
    assert in_thread(lambda: (lower_thread_priority(), thread_nice())) == (True, expected())
    assert thread_nice() == main  # the caller's own priority is untouched


def test_twice_or_from_a_background_thread_it_stays_at_one_level():
    def nested():
        lower_thread_priority()
        lower_thread_priority()
        # a thread made by a background thread starts at its nice value: not lowered again
        return thread_nice(), in_thread(lambda: (lower_thread_priority(), thread_nice())[1])

    assert in_thread(nested) == (expected(), expected())


def test_refused_it_says_so_and_the_thread_runs_on(monkeypatch):
    def refuse(*_):
        raise PermissionError("not permitted")

    monkeypatch.setattr(priority.os, "setpriority", refuse)
    assert in_thread(lambda: (lower_thread_priority(), thread_nice())) == (False, thread_nice())
    assert in_thread(lambda: lower_thread_priority(by=0)) is False


def test_the_staging_threads_give_way():
    staging = Staging(ALIGN, 2, pin=False)
    try:
        assert staging.crc.submit(thread_nice).result() == expected()
        if staging.copier is not None:
            assert staging.copier.submit(thread_nice).result() == expected()
    finally:
        staging.close()


def test_the_writer_thread_gives_way(tmp_path, monkeypatch):
    """A real save: its job's run() lowers the thread it runs on."""
    import offload
    from offload.checkpoint import job as job_mod

    seen: list[int] = []
    run = job_mod.SaveJob.run

    def spy(self):
        run(self)
        seen.append(thread_nice())

    monkeypatch.setattr(job_mod.SaveJob, "run", spy)
    model, opt = offload.wrap(tiny("llama", layers=2), device="cpu", dtype="float32")
    try:
        offload.save(model, opt, tmp_path / "ck", step=1).wait()
    finally:
        model.runtime.close()
    assert seen == [expected()]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == thread_nice()


def test_drain_release_frees_the_staging_ring_and_the_next_save_makes_one(tmp_path):
    import offload
    from offload.checkpoint import writer
    from offload.checkpoint.integrity import verify

    model, opt = offload.wrap(tiny("llama", layers=2), device="cpu", dtype="float32")
    try:
        first = offload.save(model, opt, tmp_path / "ck", step=1)
        writer.drain(model.runtime, release=True)  # waits for the save, then frees its ring
        assert first.done() and writer._SAVERS[model.runtime].staging is None
        second = offload.save(model, opt, tmp_path / "ck", step=2).wait()
        assert writer._SAVERS[model.runtime].staging is not None
        assert verify(second) == []
    finally:
        model.runtime.close()
