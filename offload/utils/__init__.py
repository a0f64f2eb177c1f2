"""Small helpers shared by the CLI and the library: byte sizes."""

from offload.utils.sizes import format_bytes, parse_bytes

__all__ = ["format_bytes", "parse_bytes"]
