"""The daemons' log: journald's view of a service's stderr (a leaf).

`<N>` syslog priority prefixes when stderr is the journal (journald strips
them and records the level), then the seed's
`PROGRAM[PID]: [LEVEL] file:line:function: message` shape -- the same for
virtio-net-controller and vfe-vhostd.  `virtnet log --level` changes the
controller's level at run time (controller/control.py).
"""
from __future__ import annotations

import logging
import os
import sys

LOG_LEVELS = {"err": logging.ERROR, "info": logging.INFO, "debug": logging.DEBUG}


def setup_logging(program: str, level: str) -> None:
    """Log to stderr at ``level`` (a LOG_LEVELS name), lines naming ``program``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(program))
    logging.basicConfig(level=LOG_LEVELS[level], handlers=[handler])
    logging.getLogger("pyroute2").setLevel(logging.WARNING)   # netlink chatter at debug


class JournalFormatter(logging.Formatter):
    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, program: str):
        super().__init__()
        self.program = program
        # systemd sets JOURNAL_STREAM when stderr is the journal: only then the
        # <N> prefix (a terminal or a log file gets the plain line)
        self.prefix = bool(os.environ.get("JOURNAL_STREAM"))

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        prio = f"<{self.PRIORITY.get(record.levelno, 6)}>" if self.prefix else ""
        return (f"{prio}{self.program}[{record.process}]: [{record.levelname}] "
                f"{record.filename}:{record.lineno}:{record.funcName}: {msg}")
