"""structlog setup shared by every TRACE process: JSON lines when stderr is not a TTY, coloured
key=value lines when it is. Call `setup_logging()` once, in an entrypoint."""

from __future__ import annotations

import logging
import sys

import structlog


def level_number(level: str) -> int | None:
    """The logging level named `level` (any case: debug, info, warning, warn, error, ...), or None for no level."""
    lvl = getattr(logging, level.upper(), None)
    return lvl if isinstance(lvl, int) else None


def setup_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog (and the stdlib root logger, so aiohttp's logs share the format)."""
    if json is None:
        json = not sys.stderr.isatty()
    lvl = level_number(level)
    if lvl is None:
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s", force=True)


class _Stderr:
    """Writes to whatever `sys.stderr` is at the time of each line, not the stream it was when logging was set up
    (a caller that redirects stderr, e.g. a test capturing it, must not leave loggers writing to a closed file)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
