"""The notebook API: the documents of DESIGN.md, written and read with a synchronous pymongo client.

Nothing here talks to a daemon directly: `submit` inserts a `_models` document, `predict` a
`_requests` document, and both wait by reading them back, so whatever this does can be done from
mongosh or any driver. `load` downloads a checkpoint from GridFS through the same verified path the
daemon serves from.
"""

import tempfile
from pathlib import Path

from bson import ObjectId
from pymongo import MongoClient
from rich.console import Console

from listener.cli.alive import waiting_note
from listener.definitions import insert_model, replace_model
from listener.follow import finished, follow_training, wait_for
from listener.settings import Settings
from training import checkpoints as stored_checkpoints
from training import defaults, ids
from training.defaults import Status
from training.config import parse_model, parse_request
from training.limits import Limits

WEEK_S = 7 * 24 * 3600.0


class JobFailed(RuntimeError):
    """Training or a request ended other than well; `document` is its last state."""

    def __init__(self, message: str, document: dict):
        super().__init__(message)
        self.document = document


def _error_of(document: dict) -> str:
    error = document.get("error") if isinstance(document.get("error"), dict) else {}
    return error.get("message") or f"status {document.get('status')}"


class Client:
    """One database of mongotune documents.

    >>> tune = Client("mongodb://localhost:27017/mydb?replicaSet=rs0")
    >>> model_id = tune.submit({"_id": "pirate", "model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    ...                         "data": {"collection": "pirate_chat", "key": "messages"}})
    >>> tune.wait(model_id); tune.predict(model_id, "Hello?")

    `uri` None uses the embedded server `listener start` runs; `db` defaults to the URI's path, then
    MONGOTUNE_DB, then "mongotune". `limits` are the operator's caps documents are checked against
    before they are inserted (default: the MONGOTUNE_* settings of this environment).
    """

    def __init__(self, uri: str | None = None, db: str | None = None, *, limits: Limits | None = None):
        from listener.connection import database_name
        from listener.settings import Settings

        if uri is None:
            from listener.embedded import EmbeddedServer

            server = EmbeddedServer()
            if not server.answering():
                raise ConnectionError("no uri given and the embedded server is not running: start it with "
                                      "`listener start`, or pass a uri")
            uri = server.uri
        self.client = MongoClient(uri, appname="mongotune-python", **defaults.CODEC)
        self.db = self.client[database_name(uri, db)]
        self.limits = limits or Settings.load().limits

    def model(self, model_id) -> dict:
        """The model document as it is now; LookupError if there is none."""
        document = self.db[defaults.MODELS].find_one({"_id": ids.eq(model_id)})
        if document is None:
            raise LookupError(f"no model {model_id!r} in {self.db.name}.{defaults.MODELS}")
        return document

    def submit(self, definition: dict, replace: bool = False):
        """Insert a model definition once the daemon's parser accepts it; returns its `_id`.

        A definition without `_id` gets an ObjectId. Raises `training.config.SpecError` naming the
        field to change (`_id` when a model has it already), with nothing written. `replace=True`
        makes the definition the next run of the model with its `_id` (its runs and checkpoints
        stay, the run's entry says what changed); `listener.definitions.Busy` while that model
        trains.
        """
        document = dict(definition)
        document.setdefault("_id", ObjectId())
        parse_model(document, self.limits)
        if replace:
            return replace_model(self.db[defaults.MODELS], document)[0]["_id"]
        return insert_model(self.db[defaults.MODELS], document)

    def wait(self, model_id, progress: bool = True, timeout: float = WEEK_S) -> dict:
        """Wait until training ends (a progress bar with step, loss and ETA); returns the final document.

        Raises `JobFailed` with the document's error message when it failed or was cancelled.
        """
        models = self.db[defaults.MODELS]
        if progress:
            note = waiting_note(self.db, Settings.load().heartbeat_s)
            document = follow_training(Console(), models, model_id, timeout, note=note)
        else:
            document = wait_for(models, model_id, finished, timeout)
        if document["status"] != Status.SUCCEEDED:
            raise JobFailed(f"model {model_id!r} {document['status']}: {_error_of(document)}", document)
        return document

    def predict(self, model_id, input, checkpoint="best", params: dict | None = None, timeout: float = 600.0) -> str:
        """Insert a `_requests` document and return its `output` once a daemon has answered it."""
        request = {"_id": ObjectId(), "model": model_id, "input": input, "checkpoint": checkpoint,
                   "params": params or {}}
        parse_request(request, self.limits)
        requests = self.db[defaults.REQUESTS]
        request_id = requests.insert_one(request).inserted_id
        answer = wait_for(requests, request_id, finished, timeout)
        if answer["status"] != Status.DONE:
            raise JobFailed(f"request {request_id} {answer['status']}: {_error_of(answer)}", answer)
        return answer["output"]

    def checkpoints(self, model_id) -> list[dict]:
        """The checkpoints the model document lists (run, step, metrics, files_id, size, created_at)."""
        return stored_checkpoints.listed(self.model(model_id).get("checkpoints"))

    def load(self, model_id, checkpoint="best", folder: Path | None = None):
        """(model, tokenizer): the base model with the checkpoint's adapter applied, loaded here.

        The archive is downloaded from GridFS only after its metadata shows it is this model's, and
        unpacked by the same allowlist serving uses (safetensors only), into `folder` (where a second
        load finds it again) or a new temporary one. `checkpoint` is "best", "latest", "base" or
        {"run": R, "step": S}.
        """
        from training.inference import load

        document = self.model(model_id)
        spec = parse_model(document, self.limits)
        entry = stored_checkpoints.select(document, checkpoint)
        target = None
        if entry is not None:
            found = stored_checkpoints.stored(self.db, entry, model_id)
            parent = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="mongotune-"))
            target = parent / ids.file_name(model_id, f"-run{found.run}-step{found.step}")
            if not target.is_dir():  # a folder `download` left is whole: it renames a finished unpack into place
                stored_checkpoints.download(self.db, found.files_id, target, max_bytes=self.limits.max_checkpoint_bytes)
        loaded = load(spec, self.limits, target)
        return loaded.model, loaded.tokenizer

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
