"""Package and protocol versions. API_VERSION changes only with an incompatible change to the HTTP contract."""

__version__ = "0.1.0"
API_VERSION = 1
SNAPSHOT_FORMAT = "trace-snapshot"
SNAPSHOT_FORMAT_VERSION = 1
