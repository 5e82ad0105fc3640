"""Disk the listener leaves behind stays bounded: work folders of killed children, old job logs."""

import logging
import os
import shutil

from listener.settings import Settings

log = logging.getLogger(__name__)

LOG_FILES_KEPT = 200  # job logs kept in the home, newest first


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean(settings: Settings) -> None:
    """At start: remove the work folders of training children that are gone, and the oldest job logs."""
    work = settings.home / "work"
    for folder in work.iterdir() if work.is_dir() else ():
        if not (folder.name.isdigit() and _running(int(folder.name))):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the work folder of a training process that is gone (%s)", folder.name)
    logs = sorted(settings.job_logs.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True) \
        if settings.job_logs.is_dir() else []
    for old in logs[LOG_FILES_KEPT:]:
        old.unlink(missing_ok=True)
