"""What crosses the wire between TRACE's processes: wire structs, the codec, the env client, logging setup."""

from shared.version import API_VERSION, __version__

__all__ = ["API_VERSION", "__version__"]
