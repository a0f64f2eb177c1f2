"""The ``offload`` console command: ``offload --version``, ``offload doctor``, ``offload bench io``.

Command modules import torch and the native engine inside their run functions, so ``offload
--version`` and ``--help`` stay instant.
"""


class CliError(Exception):
    """A user-facing failure: printed as ``offload: error: <message>`` without a traceback."""
