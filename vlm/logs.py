"""One logging set-up for every entry point, rank-aware: under a distributed launch rank 0 prints progress,
the other ranks print only warnings and errors, so N processes do not repeat every line N times."""

from __future__ import annotations

import logging
import os

# bitsandbytes warns on import that an optional CPU kernel package is absent; nothing here depends on it.
QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR}


def rank() -> int:
    """This process's global rank as the launchers (deepspeed, torchrun) export it; 0 outside a launch."""
    return int(os.environ.get("RANK", 0))


class _WarningsOffRankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def setup_logging(verbose: bool = False, fmt: str = "%(levelname)s %(message)s") -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt)
    if rank() != 0:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WarningsOffRankZero())
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
