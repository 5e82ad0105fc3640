"""Serving's places apportioned (issue 21): long-lived work has a budget of its own, a request's own deadline
ends only its own generation, and one model named by two integer types is one model to its share."""

import asyncio
import time

from bson import Int64

from listener.batching import Queues
from listener.forks import Forks
from listener.intake import Intake
from listener.records import SkipLog
from listener.serving import Serving
from listener.settings import Settings
from tests.conftest import settled, wait_for
from tests.documents import ANSWERS, collection_request, request
from tests.test_inference import PROMPTS, limits_for, spec_for
from tests.test_serving import LOOP, served_model
from tests.test_status import run_with
from training import defaults, ids
from training.config import GenerationParams, parse_request
from training.inference import Deadline, answer as answer_prompts, generate, load, prompt_ids
from training.limits import Limits

WORKER_STARTED = "serving worker started"

# the operator allows answers into every data collection and long generations (conftest.module_daemon)
DAEMON_ENV = {**ANSWERS, "MONGOTUNE_REQUEST_LEASE_S": "3", "MONGOTUNE_MAX_NEW_TOKENS": "2000"}


# --- long-lived work has a budget of its own ------------------------------------------------------------------------

def spec(doc_id, model, **fields):
    return parse_request({"_id": doc_id, "model": model, "input": "hi", **fields}, Limits(answer_collections=("*",)))


def held_after_one_round(uri: str, db_name: str, limits: dict) -> list[str]:
    """The keys of the requests one claim round of a daemon with these settings holds (its collection jobs run until
    cancelled, so they keep their places)."""
    async def work(adb):
        settings = Settings.load({"db": adb.name, "validators": False, **limits}, environ=ANSWERS)
        counters = {"requests_done": 0, "requests_failed": 0}
        serving = Serving(adb, settings, "d", counters, Forks(gpus=False),
                          collection_job=lambda serving, spec: asyncio.Event().wait())
        intake = Intake(adb, settings, "d", serving, counters, SkipLog(), stopping=lambda: False)
        await intake.round()
        return [ids.key(doc_id) for doc_id in serving.queues.held_ids()]

    return run_with(uri, db_name, work)


def test_requests_over_a_collection_count_against_places_of_their_own():
    q = Queues(Settings.load({"max_queued_requests": 2, "max_queue_per_model": 1, "max_collection_jobs": 2,
                              "max_collection_jobs_per_model": 1}, environ={}))
    for held in (spec("w1", "a", collection="notes", output_field="x", watch=True),
                 spec("w2", "b", collection="notes", output_field="x", watch=True)):
        assert q.hold(held)
    assert q.free(collection=True) == 0 and q.full(collection=True) == [["a", "notes"], ["b", "notes"]]
    assert q.free() == 2 and q.room_for("a") == 1 and q.full() == [], "jobs took interactive places"
    assert q.hold(spec("plain", "a"))
    assert q.free() == 1 and q.room_for("a") == 0 and q.room_for(["a", "notes"], collection=True) == 0
    assert q.room_for(["a", "theirs"], collection=True) == 1, "a model's places over one collection are all of it"
    q.release("w1")
    assert q.free(collection=True) == 1 and q.room_for(["a", "notes"], collection=True) == 1 and q.room_for("a") == 0


def test_a_claim_takes_each_kind_of_request_within_its_own_places(server_uri, db):
    """Jobs over a collection found first never fill the interactive places, nor the other way round; what is over
    a kind's places stays pending for another daemon."""
    requests = db[defaults.REQUESTS]
    requests.insert_many([collection_request(f"job{n}", model, "notes", watch=True)
                          for n, model in enumerate(("w1", "w1", "w2", "w3"))])
    requests.insert_many([request(f"plain{n}", model) for n, model in enumerate(("a", "a", "b", "c"))])

    held = held_after_one_round(server_uri, db.name, {"max_queued_requests": 2, "max_queue_per_model": 1,
                                                      "max_collection_jobs": 2, "max_collection_jobs_per_model": 1})
    assert sorted(held) == sorted(ids.key(doc_id) for doc_id in ("job0", "job2", "plain0", "plain2"))
    assert requests.count_documents({"status": "running"}) == 4


def test_a_models_places_are_per_collection_so_one_writers_requests_never_take_anothers(server_uri, db):
    """Any writer may name any model: requests over one collection take that model's places over it alone, and a
    request over another collection on the same model is claimed beside them (the find leaves out only the full
    model-and-collection pair)."""
    requests = db[defaults.REQUESTS]
    requests.insert_many([collection_request(f"a{n}", "b-model", "a_feed", watch=True) for n in range(3)])
    requests.insert_one(collection_request("b-once", "b-model", "b_notes"))

    held = held_after_one_round(server_uri, db.name, {"max_collection_jobs": 4, "max_collection_jobs_per_model": 1})
    assert ids.key("b-once") in held and len(held) == 2, held



def test_class3_watching_requests_never_take_every_place_of_a_daemon(db, start_daemon, tiny_model_path):
    """A collection job holds its place for as long as it runs, and with `watch` that is until someone cancels it:
    a few watching requests must not take every place this daemon claims against
    (`MONGOTUNE_MAX_QUEUED_REQUESTS`). Here the operator allows 2 places, each model 1."""
    db[defaults.MODELS].insert_many([served_model(name, tiny_model_path) for name in ("w1", "w2", "plain")])
    db.watched.insert_one({"_id": 1, "text": "ahoy"})
    start_daemon(env={**ANSWERS, "MONGOTUNE_MAX_QUEUED_REQUESTS": "2", "MONGOTUNE_MAX_QUEUE_PER_MODEL": "1"})
    requests = db[defaults.REQUESTS]
    for n, model_id in enumerate(("w1", "w2")):
        requests.insert_one(collection_request(f"watch{n}", model_id, "watched", output_field=f"answer{n}",
                                               watch=True))
    for n in range(2):
        wait_for(requests, f"watch{n}", lambda d: (d.get("progress") or {}).get("done") == 1, timeout_s=120)
    requests.insert_one({"_id": "lone", "model": "plain", "input": "ahoy", "checkpoint": "base",
                         "params": {"max_new_tokens": 2}})
    lone = settled(db, "lone", timeout=60)
    requests.update_many({"watch": True}, {"$set": {"cancel": True}})
    assert lone.get("status") == "done", f"a plain request was never answered beside two watching ones: {lone}"


# --- a request's own deadline -------------------------------------------------------------------------------------

def test_class3_a_requests_own_timeout_never_kills_the_shared_serving_worker(module_db, module_daemon,
                                                                            tiny_model_path):
    """`timeout_s` is the request's own limit: past it a request fails as `timeout`, and the shared worker, with
    every base and adapter it holds for everyone, goes on. Only the operator's limit may kill the worker."""
    db = module_db
    db[defaults.MODELS].insert_one(served_model("deadline", tiny_model_path))
    requests = db[defaults.REQUESTS]
    requests.insert_one({"_id": "warm", "model": "deadline", "input": "ahoy", "checkpoint": "base",
                         "params": {"max_new_tokens": 2}})
    assert settled(db, "warm")["status"] == "done"
    started = module_daemon.log().count(WORKER_STARTED)
    assert started >= 1
    # 16 requests generating alike make one batch; 16 x 1,500 tokens take the tiny model several seconds (one alone
    # about two: 500 took 0.75 s on a quiet 2-core machine).
    requests.insert_many([{"_id": f"hasty{n}", "model": "deadline", "input": f"ahoy matey {n} " * 20,
                           "checkpoint": "base", "timeout_s": 1, "params": {"max_new_tokens": 1500}}
                          for n in range(16)])
    hasty = [settled(db, f"hasty{n}") for n in range(16)]
    assert any((h.get("error") or {}).get("type") == "timeout" for h in hasty), "no request ran past its timeout_s"
    requests.insert_one({"_id": "after", "model": "deadline", "input": "ahoy", "checkpoint": "base",
                         "params": {"max_new_tokens": 2}})
    assert settled(db, "after")["status"] == "done"
    assert module_daemon.log().count(WORKER_STARTED) == started, "a request's own timeout_s killed the worker"


def test_past_its_deadline_a_batch_fails_only_the_answers_still_generating(tiny_model_path):
    """A model whose logits are all equal always says token 0: the answers go on until the deadline stops them,
    unless token 0 is their end."""
    served = load(spec_for(tiny_model_path), limits_for(tiny_model_path), None)
    served.model.get_output_embeddings().weight.data.zero_()
    tokens = [prompt_ids(served.tokenizer, prompt) for prompt in PROMPTS[1:]]
    params, past = GenerationParams(max_new_tokens=50), Deadline(timeout_s=1, at=time.monotonic())
    cut = generate(served, tokens, params, deadline=past)
    assert [r["error"]["type"] for r in cut] == ["timeout"] * 2
    assert "timeout_s of 1 s" in cut[0]["error"]["message"]
    served.tokenizer.eos_token = served.tokenizer.convert_ids_to_tokens(0)
    ended = generate(served, tokens, params, deadline=past)
    assert [(r["finish_reason"], r["usage"]["completion_tokens"]) for r in ended] == [("stop", 1)] * 2


def test_a_template_that_loops_stops_at_the_requests_deadline_in_the_worker_itself(tiny_model_path):
    served = load(spec_for(tiny_model_path), limits_for(tiny_model_path), None)
    served.tokenizer.chat_template = LOOP
    looped, plain = answer_prompts(served, [PROMPTS[0], PROMPTS[1]], GenerationParams(max_new_tokens=2),
                                   deadline=Deadline.after(0.5))
    assert looped["error"]["type"] == "timeout" and "rendering the prompt" in looped["error"]["message"]
    assert plain["error"]["type"] == "timeout", "the deadline is one for the whole command"


# --- identity exact -------------------------------------------------------------------------------------------------

def test_integers_of_either_width_are_one_id_at_any_depth():
    assert ids.key(5) == ids.key(Int64(5)) and ids.key(2**40) == ids.key(Int64(2**40))
    assert ids.key([Int64(5), {"step": Int64(3)}]) == ids.key([5, {"step": 3}])
    assert ids.file_name(Int64(5)) == ids.file_name(5)
    assert len({ids.key(value) for value in (5, "5", True, 5.0)}) == 4


def test_requests_for_one_model_named_by_either_integer_width_share_its_places():
    q = Queues(Settings.load({"max_queue_per_model": 2}, environ={}))
    assert q.hold(spec("as-int32", 5)) and q.hold(spec("as-int64", Int64(5)))
    assert q.room_for(5) == 0 and q.room_for(Int64(5)) == 0 and len(q.full()) == 1
    assert q.hold(spec(Int64(7), "m")) and not q.hold(spec(7, "m")), "one request named by two widths is one"


def test_class7_one_model_named_by_two_integer_types_is_one_model_to_its_share(db, start_daemon, tiny_model_path):
    """The server's `$eq` (and its unique `_id` index) make `5` and `Int64(5)` one document: `Serving._model` serves
    both from model 5, so its requests must count as model 5's against its share (`MONGOTUNE_MAX_QUEUE_PER_MODEL`)."""
    db[defaults.MODELS].insert_one(served_model(5, tiny_model_path))
    assert db[defaults.MODELS].find_one({"_id": {"$eq": Int64(5)}})["_id"] == 5  # the server's numeric equality
    db[defaults.REQUESTS].insert_many([
        {"_id": "as-int32", "model": 5, "input": "ahoy", "checkpoint": "base", "params": {"max_new_tokens": 8}},
        {"_id": "as-int64", "model": Int64(5), "input": "ahoy", "checkpoint": "base", "params": {"max_new_tokens": 8}},
    ])
    start_daemon(env={"MONGOTUNE_MAX_QUEUE_PER_MODEL": "1"})
    first, second = settled(db, "as-int32"), settled(db, "as-int64")
    assert first["status"] == "done", first
    if second["status"] == "failed":
        return  # Int64(5) named no model: exact
    assert second["status"] == "done", second
    overlapped = max(first["started_at"], second["started_at"]) < min(first["completed_at"], second["completed_at"])
    assert not overlapped, ("model 5 held two places at once with a share of one: claimed at "
                            f"{first['started_at']} and {second['started_at']}, answered at {first['completed_at']} "
                            f"and {second['completed_at']}")
