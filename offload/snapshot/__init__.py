"""In-memory erasure-coded snapshots (issue 8).

``offload.snapshot.codec`` is the Reed-Solomon codec over GF(2^8): k data chunks and m parity
chunks, any k of which restore the data (docs/snapshot.md). Importing this package loads nothing
else: the codec, numpy and the native core load with ``from offload.snapshot import codec``.
"""
