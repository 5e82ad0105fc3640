"""Error text written into documents: what to change, never where things live on the host.

Anyone who can read `_models` or `_requests` reads `error`, so file system paths (the listener's
home, temporary folders, site-packages in a traceback) are replaced before a message is written.
"""

import re

MAX_CHARS = 2_000
_PATH = re.compile(r"(?<![\w.:/-])(?:~|\.{1,2})?/[^\s'\"()<>,;]+")


def cut(text: str, limit: int = MAX_CHARS) -> str:
    """`text` within `limit` characters, saying how much was left off: an error that repeats what a writer gave
    (megabytes of field names) still fits its document, and the job's log line stays readable."""
    return text if len(text) <= limit else f"{text[:limit]}…(+{len(text) - limit:,} chars)"


def public_message(text: str) -> str:
    """`text` without host paths, cut to a readable length."""
    return cut(_PATH.sub("<path>", text))


def said(exc: Exception) -> str:
    """What an exception says: for the server's refusal its `errmsg` alone, never its whole reply, which holds the
    deployment's `$clusterTime` signature and is no business of a document's."""
    details = getattr(exc, "details", None)
    if isinstance(details, dict) and details.get("errmsg"):
        return f"{details['errmsg']} (code {getattr(exc, 'code', None)})"
    return str(exc) or type(exc).__name__


def briefly(exc: Exception) -> str:
    """`said`, short enough for a model's `warnings` and a log line."""
    return cut(said(exc), 300)
