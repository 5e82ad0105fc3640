"""Every collection name, interval and limit in one place.

Plain constants, so `training/` may read them without pulling in the daemon. The timings an
operator may need to tune are read from the environment.
"""

import os

MODELS = "_models"  # one document per model definition and its training state
REQUESTS = "_requests"  # one document per prediction request
CHECKPOINTS = "_checkpoints"  # GridFS bucket holding checkpoint archives
LISTENER = "_listener"  # resume tokens and live daemons' heartbeats

ENV_URI = "MONGOTUNE_URI"  # the MongoDB URI when --uri is not given
ENV_DB = "MONGOTUNE_DB"  # the database when neither --db nor the URI path names one
ENV_HOME = "MONGOTUNE_HOME"  # working folder: embedded server data, job logs, model caches
ENV_DAEMON_PID = "MONGOTUNE_DAEMON_PID"  # set for a training child: the daemon it must not outlive
ENV_LEASE_OWNER = "MONGOTUNE_LEASE_OWNER"  # set for a training child: its writes only land while this holds
DEFAULT_DB = "mongotune"  # database used when nothing names one

EMBEDDED_PORT = 27217  # the embedded server's port, away from a real mongod's 27017
EMBEDDED_REPLICA_SET = "secantus"  # SecantusDB presents itself as this one-node replica set
EMBEDDED_START_TIMEOUT_S = 60.0  # how long to wait for the embedded server to answer

LEASE_S = float(os.environ.get("MONGOTUNE_LEASE_S", 60))  # a claim's lifetime; renewed every LEASE_S / 4
MAX_ATTEMPTS = int(os.environ.get("MONGOTUNE_MAX_ATTEMPTS", 3))  # claims of one run before it is failed
HEARTBEAT_S = 5.0  # how often a daemon writes its heartbeat record
SCAN_S = float(os.environ.get("MONGOTUNE_SCAN_S", 30))  # catch-up scan for pending documents a stream may not have delivered
CANCEL_POLL_S = 2.0  # how often a running training looks for `cancel: true`
CHILD_KILL_GRACE_S = 30.0  # SIGTERM to SIGKILL for a training child told to stop

MAX_TRAINING_JOBS = 1  # trainings one daemon runs at once (one per GPU host by default)
MAX_NEW_TOKENS = 512  # operator cap on `params.max_new_tokens`
MAX_INPUT_CHARS = 32_000  # operator cap on a request's input length, all messages together
MAX_MESSAGES = 200  # operator cap on the messages in one chat request
MAX_BATCH = 16  # requests for one model generated together
BATCH_WINDOW_S = 0.05  # wait this long after a request arrives for others to batch with it
MAX_CACHED_MODELS = 2  # loaded models kept in memory for serving
ERROR_TAIL_CHARS = 2_000  # how much of a crashed child's log goes into `error`

# Exit codes of the training child (`python -m training.run`), read by the daemon's supervisor.
EXIT_OK = 0  # trained to the end
EXIT_FAILED = 1  # an error, written into the document's `error`
EXIT_INVALID = 3  # the document cannot be trained as written; `error` names the field
EXIT_CANCELLED = 4  # `cancel: true` seen; a final checkpoint was saved
EXIT_STOPPED = 5  # SIGTERM: a checkpoint was saved and the run can be resumed by any daemon
EXIT_ORPHANED = 6  # the daemon that started it died; the run will be resumed once its lease expires
EXIT_LEASE_LOST = 7  # another daemon holds the run now; this child stopped writing and left
