"""Error text written into documents: what to change, never where things live on the host.

Anyone who can read `_models` or `_requests` reads `error`, so file system paths (the listener's
home, temporary folders, site-packages in a traceback) are replaced before a message is written.
"""

import re

MAX_CHARS = 2_000
_PATH = re.compile(r"(?<![\w.:/-])(?:~|\.{1,2})?/[^\s'\"()<>,;]+")


def public_message(text: str) -> str:
    """`text` without host paths, cut to a readable length."""
    return _PATH.sub("<path>", text)[:MAX_CHARS]
