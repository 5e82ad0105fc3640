"""Answers written into a collection (issue 21): only where the operator allows, only over fields the listener
wrote for the same request, never a trigger of another answer, and never a job that one document stops or
that loops on documents its writes cannot reach.

The daemon tests share one daemon whose operator allows answers in every data collection
(`MONGOTUNE_ANSWER_COLLECTIONS=*`). The in-process tests run the real `CollectionJob` and `Serving` against the
real server, with only generation stood in for (what they check is what is written, not what a model says).
"""

import asyncio

import pytest
from pymongo import AsyncMongoClient

from listener.batch_predictions import CollectionJob
from listener.forks import Forks
from listener.serving import Serving
from listener.settings import Settings
from tests.conftest import DaemonProcess, fresh_database
from tests.test_serving import answer, served_model
from training import defaults
from training.config import SpecError, parse_request

ANSWERS = {"MONGOTUNE_ANSWER_COLLECTIONS": "*"}  # the operator lets answers be written into any data collection
OWNER = "in-process"


def collection_request(doc_id, model_id, collection, **fields) -> dict:
    return {"_id": doc_id, "model": model_id, "collection": collection, "input": "{text}", "output_field": "answer",
            "checkpoint": "base", "params": {"max_new_tokens": 2}, **fields}


def settled(db, doc_id, timeout: float = 120) -> dict:
    """The request once finished, or as it is after `timeout` (so a test can say what it still is)."""
    try:
        return answer(db, doc_id, timeout)
    except TimeoutError:
        return db[defaults.REQUESTS].find_one({"_id": doc_id})


@pytest.fixture(scope="module")
def answers_db(client):
    yield from fresh_database(client, "a21")


@pytest.fixture(scope="module")
def answering_daemon(server_uri, answers_db, tmp_path_factory, model_root, request):
    """One daemon for the module's tests that write answers into collections: the operator allows every data
    collection, and request leases are short so a stopped collection job is retried within seconds."""
    daemon = DaemonProcess(server_uri, answers_db.name, tmp_path_factory.mktemp("answering"), "answering", 2,
                           env={**ANSWERS, "MONGOTUNE_REQUEST_LEASE_S": "3", "MONGOTUNE_MAX_NEW_TOKENS": "2000"},
                           model_root=model_root)
    failed = request.session.testsfailed
    yield daemon
    daemon.stop()
    if request.session.testsfailed > failed:
        print(f"--- log of the answering daemon ---\n{daemon.log()[-8000:]}")


class Answering(Serving):
    """The real `Serving` around a real database, generation stood in for: each prompt's answer is the prompt;
    `meanwhile` runs first, as another user writing while the model generates."""

    def __init__(self, adb, meanwhile=None, **options):
        settings = Settings.load({"db": adb.name, "validators": False, **options}, environ=ANSWERS)
        super().__init__(adb, settings, OWNER, {"requests_done": 0, "requests_failed": 0}, Forks(gpus=False),
                         collection_job=None)
        self.meanwhile = meanwhile or (lambda: None)

    async def resolve(self, model_id, checkpoint):
        return {"_id": model_id}, None

    async def generate(self, model, entry, prompts, params):
        self.meanwhile()
        return [{"output": f"re: {prompt}"} for prompt in prompts]


def run_job(client, db, document: dict, meanwhile=None, **options) -> dict:
    """Run one collection request to its end in this process, as the daemon that claimed it; the request after."""
    db[defaults.REQUESTS].insert_one({**document, "status": "running", "lease": {"owner": OWNER}})
    spec = parse_request(document, Settings.load({}, environ=ANSWERS).limits)

    async def job():
        async_client = AsyncMongoClient(client.address[0], client.address[1], directConnection=True)
        try:
            serving = Answering(async_client[db.name], meanwhile, **options)
            await asyncio.wait_for(CollectionJob(serving, spec).answer_all(), 60)  # a bound, should it loop
        finally:
            await async_client.close()

    asyncio.run(job())
    return db[defaults.REQUESTS].find_one({"_id": document["_id"]})


# --- class 1: no confused deputy ---------------------------------------------------------------------------------

def test_class1_answers_are_refused_by_default_and_allowed_where_the_operator_lists(limits):
    """Reading a collection for training grants no writes: answers need `MONGOTUNE_ANSWER_COLLECTIONS`, which
    takes patterns like `MONGOTUNE_COLLECTIONS` and is empty by default; the refusal names it."""
    document = collection_request("r", "m", "notes_a")
    with pytest.raises(SpecError) as refused:
        parse_request(document, limits)
    assert refused.value.field == "collection" and "MONGOTUNE_ANSWER_COLLECTIONS" in refused.value.message
    listed = Settings.load({}, environ={"MONGOTUNE_ANSWER_COLLECTIONS": "notes_*, summaries"}).limits
    assert listed.answer_collections == ("notes_*", "summaries")
    assert parse_request(document, listed).collection == "notes_a"
    assert parse_request({**document, "collection": "summaries"}, listed).collection == "summaries"
    with pytest.raises(SpecError) as elsewhere:
        parse_request({**document, "collection": "notes"}, listed)
    assert elsewhere.value.field == "collection"


def test_class1_answers_are_written_into_a_collection_only_where_the_operator_allows(db, start_daemon,
                                                                                      tiny_model_path):
    """No allowlist of collections answers may be written into exists: a daemon with default settings lets anyone
    who may insert a request `$set` a field of their choosing on every document of any data collection it may
    read (a read grant for training became a write grant). With none allowed by default, the request must fail
    naming the setting and leave the collection as it was."""
    db[defaults.MODELS].insert_one(served_model("writer", tiny_model_path))
    db.shared_notes.insert_many([{"_id": n, "text": f"ahoy {n}"} for n in range(3)])
    start_daemon()
    db[defaults.REQUESTS].insert_one(collection_request("write-anywhere", "writer", "shared_notes"))
    ended = settled(db, "write-anywhere")
    written = [d["_id"] for d in db.shared_notes.find({"answer": {"$exists": True}})]
    assert written == [], f"answers were written into shared_notes on a document's say-so: {written}"
    assert ended["status"] == "failed", ended
