"""Every collection name, variable name, status and exit code in one place, and the one clock.

Plain constants, so `training/` may read them without pulling in the daemon. What an operator
tunes (intervals, caps) is a field of `listener.settings.Settings`, read once at start.
"""

import datetime as dt
from enum import Enum, IntEnum

from bson.codec_options import DatetimeConversion

# Every client (daemon, training child, serving worker) decodes with these, so no stored value can
# make a read raise: invalid UTF-8 is replaced, dates outside Python's range stay numbers (and fail a parse).
CODEC = {"unicode_decode_error_handler": "replace", "datetime_conversion": DatetimeConversion.DATETIME_AUTO,
         "tz_aware": True}

MODELS = "_models"  # one document per model definition and its training state
REQUESTS = "_requests"  # one document per prediction request
CHECKPOINTS = "_checkpoints"  # GridFS bucket holding checkpoint archives
LISTENER = "_listener"  # resume tokens and live daemons' heartbeats
DAEMON_RECORD = "daemon:"  # `_id` prefix of a daemon's heartbeat in LISTENER, then its owner
NODE_RECORD = "node:"  # `_id` prefix of a daemon's node of a job of several in LISTENER, then owner:model key

ENV_URI = "MONGOTUNE_URI"  # the MongoDB URI when --uri is not given
ENV_DB = "MONGOTUNE_DB"  # the database when neither --db nor the URI path names one
ENV_HOME = "MONGOTUNE_HOME"  # working folder: embedded server data, job logs, model caches
ENV_LEASE_OWNER = "MONGOTUNE_LEASE_OWNER"  # set for a training child: its writes only land while this holds
DEFAULT_DB = "mongotune"  # database used when nothing names one

EMBEDDED_PORT = 27217  # lowest port a home's embedded server derives (then keeps), away from mongod's 27017
EMBEDDED_REPLICA_SET = "secantus"  # SecantusDB presents itself as this one-node replica set
EMBEDDED_START_TIMEOUT_S = 60.0  # how long to wait for the embedded server to answer
CANCEL_POLL_S = 2.0  # how often a running training looks for `cancel: true`
PROGRESS_WRITE_S = 1.0  # a training writes the metrics it logged at most this often (and at each eval and save)
NODE_COLLECTIVE_TIMEOUT_S = 180  # across nodes, a collective fails after this long; rank 0 uploads meanwhile
MAX_METRICS = 10_000  # the newest metric entries a model document keeps, far below MongoDB's 16 MB a document

class Status(str, Enum):
    """A model's or a request's `status`; `listener.status` holds the transitions between them."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # a model trained
    DONE = "done"  # a request answered
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({Status.SUCCEEDED, Status.DONE, Status.FAILED, Status.CANCELLED})


def now() -> dt.datetime:
    """Every time the listener and its children write: timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


class ChildExit(IntEnum):
    """Exit codes of the training child (`training.child`); `listener.jobs.OUTCOMES` maps them."""

    OK = 0  # trained to the end
    FAILED = 1  # an error, written into the document's `error`
    INVALID = 3  # the document cannot be trained as written; `error` names the field
    CANCELLED = 4  # `cancel: true` seen; a final checkpoint was saved
    STOPPED = 5  # SIGTERM: a checkpoint was saved and the run can be resumed by any daemon
    ORPHANED = 6  # the daemon that started it died; the run will be resumed once its lease expires
    LEASE_LOST = 7  # another daemon holds the run now; this child stopped writing and left
    NOTHING_TO_TRAIN = 8  # a feedback run whose ratings, as read, made too few rows: nothing trained, nothing changed


# The ends of a run that are no failure: no peer to wait for, no lost node to look for
# (`training.ranks`, `listener.jobs`).
ORDERLY_EXITS = (ChildExit.OK, ChildExit.CANCELLED, ChildExit.STOPPED, ChildExit.NOTHING_TO_TRAIN)
