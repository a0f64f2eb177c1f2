"""``offload ckpt ls | inspect | verify | prune``: look at checkpoints without loading them.

``ls`` lists the committed steps under a root with their sizes and which one ``latest`` names;
``inspect`` prints a checkpoint's summary and tensors (whole tensors; a multi-rank checkpoint's
sharded ones with the files of their shards); ``verify`` checks every tensor's crc32 and
the manifest, exits 0 when all is well and 1 naming each bad file and tensor otherwise. None of
them imports torch. ``prune`` deletes old steps by a retention rule (retention.py); ``export
--to hf`` writes a Hugging Face directory (export.py, imports torch); ``diff`` prints each tensor's
largest absolute difference between two checkpoints (diff.py, NumPy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offload.cli import CliError


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("ckpt", help="list, inspect and verify checkpoints", description=__doc__)
    sub = p.add_subparsers(dest="ckpt_command", metavar="ACTION")
    ls = sub.add_parser("ls", help="committed steps under a root, sizes, the latest marker")
    ls.add_argument("root", help="checkpoint root (the directory given to offload.save)")
    inspect = sub.add_parser("inspect", help="a checkpoint's tensors, dtypes, bytes and config summary")
    inspect.add_argument("path", help="a step directory, or a root (then its latest step)")
    inspect.add_argument("--limit", type=int, default=50, help="tensors to list (default 50; 0: all)")
    verify = sub.add_parser("verify", help="check every tensor's crc32 and the manifest")
    verify.add_argument("path", help="a step directory, or a root (then its latest step)")
    prune = sub.add_parser("prune", help="delete old committed steps (never the latest)")
    prune.add_argument("root", help="checkpoint root")
    prune.add_argument("--keep-last", type=int, required=True, help="keep the newest K steps")
    prune.add_argument("--keep-every", type=int, default=None, help="also keep steps divisible by N")
    prune.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    export = sub.add_parser("export", help="write the weights as a Hugging Face model directory")
    export.add_argument("path", help="a step directory, or a root (then its latest step)")
    export.add_argument("--to", choices=["hf"], required=True, help="the format (hf: Hugging Face)")
    export.add_argument("out", help="the directory to create")
    export.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default="float32", help="(default float32)"
    )
    diff = sub.add_parser("diff", help="per-tensor max abs difference of two checkpoints")
    diff.add_argument("a", help="a step directory or root")
    diff.add_argument("b", help="a step directory or root")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from offload.checkpoint.format import CheckpointError

    actions = {
        "ls": _ls,
        "inspect": _inspect,
        "verify": _verify,
        "prune": _prune,
        "export": _export,
        "diff": _diff,
    }
    action = actions.get(args.ckpt_command)
    if action is None:
        raise CliError(f"offload ckpt needs an action: {', '.join(actions)}")
    try:
        return action(args)
    except (CheckpointError, ValueError) as e:
        raise CliError(str(e)) from None


def _ls(args: argparse.Namespace) -> int:
    from offload.checkpoint.format import dir_bytes, latest_marker, list_checkpoints
    from offload.cli._table import format_table

    root = Path(args.root)
    if not root.is_dir():
        raise CliError(f"{root} is not a directory")
    found = list_checkpoints(root)
    if not found:
        print(f"{root}: no committed checkpoints")
        return 0
    latest = latest_marker(root)
    rows = [(step, p.name, _size(dir_bytes(p)), "latest" if p.name == latest else "") for step, p in found]
    print(format_table(["step", "directory", "size", ""], rows))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from offload.checkpoint.format import read_manifest, resolve
    from offload.cli._table import format_table

    path = resolve(args.path)
    m = read_manifest(path)
    tensors = m.get("tensors", {})
    total = sum(t["nbytes"] for t in tensors.values())
    cfg = m.get("config", {})
    groups = m.get("optimizer", {}).get("param_groups", [])
    print(f"checkpoint {path}")
    print(
        f"  step {m.get('step')}, format {m.get('format_version')}, written by offload {m.get('offload_version')}"
    )
    print(
        f"  model {m.get('model_class')}, {len(m.get('params', {}))} parameters, {len(tensors)} tensors, {_size(total)}"
    )
    print(f"  device {cfg.get('device')}, dtype {cfg.get('dtype')}, placement {cfg.get('placement')}")
    layout = m.get("ranks")
    if layout:
        print(
            f"  saved by {layout['world']} ranks: each rank's shard of {len(layout['records'])} records "
            "in files of its own (block.N.rankR.safetensors)"
        )
    for i, g in enumerate(groups):
        opts = ", ".join(f"{k}={g[k]}" for k in ("lr", "betas", "eps", "weight_decay") if k in g)
        print(f"  param group {i}: {opts}")
    print(
        f"  scheduler {'saved' if m.get('scheduler') is not None else 'none'}, extra keys {sorted(m.get('extra') or {})}"
    )
    shown = list(tensors.items()) if args.limit <= 0 else list(tensors.items())[: args.limit]
    rows = [
        (k, _where(t), t["dtype"], "x".join(map(str, t["shape"])) or "scalar", t["nbytes"]) for k, t in shown
    ]
    print(format_table(["tensor", "file", "dtype", "shape", "bytes"], rows))
    if len(shown) < len(tensors):
        print(f"... {len(tensors) - len(shown)} more (--limit 0 lists all)")
    return 0


def _where(entry: dict) -> str:
    """A tensor's file, or for a sharded one its shards' files (rank 0's name, ``rank*``)."""
    shards = entry.get("shards")
    if shards is None:
        return str(entry["file"])
    first = str(shards[0]["file"])
    return f"{first.rsplit('.rank', 1)[0]}.rank*.safetensors ({len(shards)} shards)"


def _verify(args: argparse.Namespace) -> int:
    from offload.checkpoint.format import resolve
    from offload.checkpoint.integrity import verify

    path = resolve(args.path)
    problems = verify(path)
    if problems:
        for p in problems:
            print(f"BAD {path / p.file}: {p.tensor or '-'}: {p.message}")
        print(f"{path}: {len(problems)} problem(s)")
        return 1
    print(f"{path}: OK")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from offload.checkpoint.retention import Retention, prune

    root = Path(args.root)
    if not root.is_dir():
        raise CliError(f"{root} is not a directory")
    retention = Retention(keep_last=args.keep_last, keep_every=args.keep_every)
    victims = prune(root, retention, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for path in victims:
        print(f"{verb} {path}")
    left = sum(".tmp-" in p.name for p in victims)
    extra = f" and {left} director{'y' if left == 1 else 'ies'} left by killed saves" if left else ""
    print(f"{root}: {verb} {len(victims) - left} step(s){extra}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import sys

    from offload.checkpoint.export import export_hf

    def progress(done: int, total: int, name: str) -> None:
        end = "\n" if done == total else ""
        print(f"\rexport {done}/{total} {name}\033[K", end=end, file=sys.stderr, flush=True)

    out = export_hf(args.path, args.out, dtype=args.dtype, progress=progress)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} ({args.dtype})")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from offload.checkpoint.diff import diff
    from offload.cli._table import format_table

    diffs = diff(args.a, args.b)
    rows = [(d.key, "-" if d.max_abs is None else f"{d.max_abs:.3g}", d.note) for d in diffs]
    print(format_table(["tensor", "max abs diff", ""], rows))
    compared = [d.max_abs for d in diffs if d.max_abs is not None]
    print(f"{len(compared)} tensors compared, max abs diff {max(compared, default=0.0):.3g}")
    return 0


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{nbytes} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
