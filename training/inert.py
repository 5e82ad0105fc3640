"""Document text made inert before a person or a log sees it: printable, markup-free, bounded.

Whoever writes documents is untrusted, and what they write reaches terminals (`listener status`,
`logs`, `predict`, ...) and the daemon's log. A control character there can move the cursor,
rewrite a line or retitle the terminal; a rich tag restyles, hides or crashes what is printed; a
megabyte value floods both. Every document-supplied string goes through `inert` on its way out,
and every log line through `InertRecords`.
"""

import logging
import traceback

from rich.markup import escape

MAX_SHOWN_CHARS = 1000  # one value on a terminal
MAX_LINE_CHARS = 4000  # one log or error line, all its values together
MAX_ANSWER_CHARS = 100_000  # a model's answer as `listener predict` prints it


def inert(value, limit: int = MAX_SHOWN_CHARS, newlines: bool = False) -> str:
    """`value` as text with each unprintable character escaped as Python writes it (`\\x1b`, `\\r`, `\\ud800`),
    rich markup escaped, and cut after `limit` characters with the count left out; `newlines` keeps line
    breaks (a model's answer)."""
    text = value if isinstance(value, str) else str(value)
    head, rest = text[:limit], len(text) - limit
    return escape(printable(head, newlines)) + (f"…(+{rest} chars)" if rest > 0 else "")


def printable(text: str, newlines: bool = False) -> str:
    """`text` with each unprintable character escaped as Python writes it; for text that is not rich markup
    (a model card escapes markdown instead)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (newlines and c == "\n") else _escaped(c) for c in text)


def _escaped(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


def inert_logging() -> None:
    """Every line the root logger's handlers write, inert: called once logging is set up in a process."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(InertRecords())


class InertRecords(logging.Filter):
    """A handler's filter that makes each record's message one inert, bounded line, whatever its arguments held,
    and its traceback inert text (`exc_text`), each frame and exception message bounded: an exception's message
    quotes documents too, and rich renders a long one in time quadratic in its length."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = inert(record.getMessage(), MAX_LINE_CHARS), ()
        if record.exc_info and record.exc_info[0] is not None:
            chunks = traceback.TracebackException(*record.exc_info).format()
            record.exc_text = "".join(inert(chunk, MAX_LINE_CHARS, newlines=True) for chunk in chunks).rstrip("\n")
        record.exc_info = None
        if record.stack_info:
            record.stack_info = inert(record.stack_info, MAX_LINE_CHARS * 4, newlines=True)
        return True
