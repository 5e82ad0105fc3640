"""Health this daemon can vouch for: a file in its own home, rewritten after each good heartbeat.

`listener status --check`, the container probes and the systemd watchdog read it, never `_listener`,
which anyone with write access to the database could forge. The file says which process wrote it
and when its last round trip to the database succeeded; a check needs that process alive and the
round trip recent.
"""

import json
import os
import time
from pathlib import Path

from training import ids


def folder(home: Path) -> Path:
    return Path(home) / "health"


class Health:
    def __init__(self, home: Path, name: str, owner: str):
        self.path = folder(home) / ids.file_name(name, ".json")
        self.record = {"name": name, "owner": owner, "pid": os.getpid(), "started_at": time.time()}

    def beat(self, **status) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps({**self.record, "ok_at": time.time(), **status}))
        staging.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"listener" in cmdline


def check(home: Path, max_age_s: float, name: str | None = None) -> tuple[bool, str]:
    """(healthy, why): a live daemon of this home (named `name`, if given) that reached its database lately."""
    paths = [folder(home) / ids.file_name(name, ".json")] if name else sorted(folder(home).glob("*.json"))
    reasons = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
            pid, ok_at = record["pid"], float(record["ok_at"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        age = time.time() - ok_at
        if not _alive(pid):
            reasons.append(f"daemon {record.get('name')!r} (pid {pid}) is not running")
        elif age > max_age_s:
            reasons.append(f"daemon {record.get('name')!r} last reached its database {age:.0f} s ago")
        else:
            return True, f"daemon {record.get('name')!r} (pid {pid}) reached its database {age:.0f} s ago"
    return False, "; ".join(reasons) or f"no daemon has run with this home ({home})"
