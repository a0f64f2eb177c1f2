"""``offload snapshot status | flush | stop``: look at a node's snapshot keeper, write its snapshots
to disk, end it. Talks to the keeper over its socket; imports no torch.

``status`` prints, per segment the keeper holds, the job, rank, buffer slot, the step its data is
committed at, the step of its parity cells, its bytes and the parity health of the newest step.
``flush --to ROOT`` writes the newest committed snapshot of each rank the keeper holds as
``ROOT/snap_<step>/rank_<r>.snap`` (also after the trainers died). ``stop`` ends the keeper and
frees its memory. ``--dir`` names the keeper's directory (default: $OFFLOAD_SNAPSHOT_DIR, else
/dev/shm/offload-<uid>); give it several times to look at several keepers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from offload.cli import CliError


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "snapshot", help="in-memory snapshots: keeper status, flush, stop", description=__doc__
    )
    sub = p.add_subparsers(dest="snapshot_command", metavar="ACTION")
    status = sub.add_parser("status", help="per keeper: step, bytes and parity health of each snapshot")
    status.add_argument("--json", action="store_true", help="print the keepers' segments as JSON")
    flush = sub.add_parser("flush", help="write the keeper's newest snapshots to a disk directory")
    flush.add_argument("--to", required=True, help="the directory (flush_dir): snap_<step>/rank_<r>.snap")
    flush.add_argument("--job", default=None, help="the job to flush (default: the only one there)")
    stop = sub.add_parser("stop", help="end the keeper (its snapshots are dropped)")
    for action in (status, flush, stop):
        action.add_argument("--dir", action="append", default=None, help="a keeper's directory (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from offload.snapshot.flush import FlushError
    from offload.snapshot.keeper import KeeperError

    actions = {"status": _status, "flush": _flush, "stop": _stop}
    action = actions.get(args.snapshot_command)
    if action is None:
        raise CliError(f"offload snapshot needs an action: {', '.join(actions)}")
    try:
        return action(args)
    except (KeeperError, FlushError) as e:
        raise CliError(str(e)) from None


def _dirs(args: argparse.Namespace) -> list[Path]:
    from offload.snapshot.keeper import runtime_dir

    return [runtime_dir(d) for d in (args.dir or [None])]


def _status(args: argparse.Namespace) -> int:
    from offload.cli._table import format_table
    from offload.snapshot.client import KeeperClient

    report: list[dict[str, Any]] = []
    for where in _dirs(args):
        client = KeeperClient.connect(where, start=False)
        try:
            report.append({"dir": str(where), "pid": client.pid, "segments": client.list()})
        finally:
            client.close()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for keeper in report:
        segs = keeper["segments"]
        total = sum(s["nbytes"] for s in segs)
        print(f"keeper {keeper['dir']} (pid {keeper['pid']}): {len(segs)} segment(s), {total} bytes")
        if not segs:
            continue
        health = _health(segs)
        rows = []
        for s in segs:
            h = s["header"] or {}
            step, pstep = h.get("step", -1), h.get("parity_step", -1)
            rows.append(
                (
                    s["job"],
                    s["rank"],
                    s["slot"],
                    None if step < 0 else step,
                    None if pstep < 0 else pstep,
                    s["nbytes"],
                    h.get("payload", 0),
                    health.get((s["job"], s["rank"], s["slot"]), ""),
                )
            )
        print(format_table(["job", "rank", "slot", "step", "parity", "bytes", "payload", "health"], rows))
    return 0


def _health(segs: list[dict[str, Any]]) -> dict[tuple[str, int, int], str]:
    """For the newest committed slot of each (job, rank): whether its parity cells are of its step."""
    newest: dict[tuple[str, int], dict[str, Any]] = {}
    for s in segs:
        h = s["header"]
        if h is None or h["step"] < 0:
            continue
        key = (s["job"], s["rank"])
        if key not in newest or h["step"] > newest[key]["header"]["step"]:
            newest[key] = s
    out = {}
    for (job, rank), s in newest.items():
        h = s["header"]
        m = h["m"]
        if m == 0:
            text = "no parity (one node)"
        elif h["parity_step"] == h["step"] and len(h["cells"]) == m:
            stripes = ", ".join(str(c["stripe"]) for c in h["cells"])
            text = f"ok: {m} cell(s) of stripe(s) {stripes}, k={len(h['group']) - m} m={m}"
        elif h["parity_step"] < 0:
            text = "degraded: no parity cells (rebuilt, or the exchange failed)"
        else:
            text = f"degraded: parity cells of step {h['parity_step']}"
        out[(job, rank, s["slot"])] = text
    return out


def _flush(args: argparse.Namespace) -> int:
    from offload.snapshot.client import KeeperClient
    from offload.snapshot.flush import flush_keeper

    for where in _dirs(args):
        client = KeeperClient.connect(where, start=False)
        try:
            for path in flush_keeper(client, Path(args.to), args.job):
                print(f"flushed {path}")
        finally:
            client.close()
    return 0


def _stop(args: argparse.Namespace) -> int:
    from offload.snapshot.client import KeeperClient

    for where in _dirs(args):
        KeeperClient.connect(where, start=False).stop()
        print(f"stopped the keeper in {where}")
    return 0
