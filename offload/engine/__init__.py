"""The streaming engine: executor, autograd Function, CPU optimizer, trace (offload.engine)."""
