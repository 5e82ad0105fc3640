"""Feedback runs: ratings written on done requests become a model's preference run (`feedback: {method, every,
filter}`), started once across daemons, from the serving adapter, recorded in the run's entry.

Two daemons share the module's database (the module's and one more), checking every half second.
"""

import asyncio
from collections import Counter
import datetime as dt
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import bson
import click
import pytest
from bson import Binary, Code, ObjectId
from click.testing import CliRunner
from pymongo import AsyncMongoClient, monitoring

from listener.cli import feedback as rating_command
from listener.cli.main import cli
from listener.feedback import ENOUGH_BATCH, FeedbackTrigger, digest
from listener.records import ModelState, SkipLog, parse
from listener import retrain
from listener.processes import wait_until
from tests.conftest import DaemonProcess, finished, settled, wait_for
from tests.documents import QUICK, insert_nested, model, nested_document, request
from training import defaults, feedback, ids, preferences
from training.config import MAX_REQUEST_ID_BYTES, ModelSpec, SpecError, parse_model, parse_request
from training.limits import Limits

DAEMON_ENV = {"MONGOTUNE_RETRAIN_CHECK_S": "0.5"}
BASE = {"_id": "m", "model_name_or_path": "org/name", "data": {"collection": "notes"}}


@pytest.fixture(scope="module")
def both_daemons(module_samples, module_daemon, server_uri, tmp_path_factory, model_root):
    """The module's daemon and a second one on the same database."""
    second = DaemonProcess(server_uri, module_samples.name, tmp_path_factory.mktemp("second"), "second", 4,
                           env=DAEMON_ENV, model_root=model_root)
    yield module_daemon, second
    second.stop()


def invoke(server_uri, db, *args):
    return CliRunner().invoke(cli, [args[0], "--uri", server_uri, "--db", db.name, *args[1:]])


def served(db, doc_id, path, **fields) -> dict:
    """A model trained once (SFT on the samples) with `fields` (its `feedback`), once it serves."""
    db[defaults.MODELS].insert_one(model(doc_id, path, **fields))
    done = wait_for(db[defaults.MODELS], doc_id, finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    return done


def answered(db, model_id, prompt: str, rating=None) -> dict:
    """A done request, inserted as any driver may (the listener never checks who answered): rated when `rating`."""
    doc_id = ObjectId()
    doc = {"_id": doc_id, "model": model_id, "input": prompt, "status": "done", "output": f"answer {doc_id} to {prompt}",
           "completed_at": doc_id.generation_time, **({"feedback": rating} if rating is not None else {})}
    db[defaults.REQUESTS].insert_one(doc)
    return doc


def feedback_run(db, model_id) -> dict:
    """The model once its first feedback run (run 2) ended. Ratings written while run 2 was pending are stamped once
    it is claimed and count toward the run after it (README), which may then start at once: run 2's entry is read, not
    the model's current run (waiting for `run == 2` and finished missed it, for ever, when run 3 had started)."""
    def second_ended(d: dict) -> bool:  # its entry has an outcome, and its end is written whole (or run 3 is on)
        return len(d.get("runs") or []) >= 2 and bool(d["runs"][1].get("outcome")) and (d["run"] > 2 or finished(d))
    done = wait_for(db[defaults.MODELS], model_id, second_ended, timeout_s=600)
    assert done["runs"][1]["outcome"] in ("succeeded", "nothing_to_train") and "error" not in done, done.get("error")
    return done


def spec_of(method: str = "kto", every: int = 2, **fields):
    """The model "victim" with `feedback` of this method and count."""
    return parse_model({**BASE, "_id": "victim", "feedback": {"method": method, "every": every, **fields}})


def rated(db, model_id, prompt, rating, **fields) -> dict:
    """A done request, rated unless `rating` is None, inserted as any writer of `_requests` may."""
    doc_id = fields.pop("_id") if "_id" in fields else ObjectId()
    doc = {"_id": doc_id, "model": model_id, "input": prompt, "status": "done", "output": f"answer to {prompt}",
           "completed_at": defaults.now(), **({"feedback": rating} if rating is not None else {}), **fields}
    insert_nested(db[defaults.REQUESTS], doc)
    return doc


def due(server_uri, db, *specs, run: int = 1, limits: Limits = Limits(), listeners: tuple = ()) -> list:
    """The models one daemon's feedback pass finds due, each succeeded at `run`; `listeners` watch its client."""
    async def one_pass():
        client = AsyncMongoClient(server_uri, tz_aware=True, event_listeners=listeners)
        try:
            trigger = FeedbackTrigger(client[db.name], limits, 10, SkipLog(), "d")
            models = {spec.id: (spec, parse(ModelState, {"_id": spec.id, "status": "succeeded", "run": run}))
                      for spec in specs}
            return [s.id for s in await trigger.due(models)]
        finally:
            await client.close()
    return asyncio.run(one_pass())


def run_entry(db, spec, limits: Limits = Limits()) -> dict:
    """What a feedback run reads and records in its `runs[]` entry (`feedback`), as the training child reads it."""
    tokenizer = lambda: SimpleNamespace(chat_template=None)  # noqa: E731  (text rows only)
    return feedback.read_datasets(db, spec, limits, tokenizer)[2]


def test_ratings_start_one_kto_run_across_two_daemons_and_its_adapter_then_serves(module_samples, both_daemons,
                                                                                 tiny_model_path, server_uri):
    db = module_samples
    first = served(db, "fb_kto", tiny_model_path, feedback={"method": "kto", "every": 4})
    requests = db[defaults.REQUESTS]
    ids = [f"fb_kto_{n}" for n in range(6)]
    requests.insert_many([request(i, "fb_kto", f"tell me about the sea, number {n}") for n, i in enumerate(ids[:5])])
    # A `feedback` present at insert fails nothing, whatever its shape; it is no rating a run reads.
    requests.insert_one(request(ids[5], "fb_kto", "and the wind?", feedback={"rating": "junk", "x": [1]}))
    for i in ids:
        assert settled(db, i)["status"] == "done", settled(db, i).get("error")
    assert requests.find_one({"_id": ids[5]})["feedback"] == {"rating": "junk", "x": [1]}

    assert invoke(server_uri, db, "feedback", "fb_kto", ids[0], "--good").exit_code == 0
    shown = invoke(server_uri, db, "feedback", "fb_kto", ids[1], "--bad", "--better", "Arr, the sea be deep.")
    assert shown.exit_code == 0 and "rated request" in shown.output, shown.output
    requests.update_one({"_id": ids[2]}, {"$set": {"feedback": {"rating": 1}}})
    requests.update_one({"_id": ids[3]}, {"$set": {"feedback": {"rating": -0.5}}})

    done = feedback_run(db, "fb_kto")
    run = done["runs"][1]
    assert run["trigger"] == "feedback" and run["method"] == "kto" and "data" not in run
    best = first["best_checkpoint"]
    assert run["init_from"] == {"model": "fb_kto", "run": best["run"], "step": best["step"]}  # the serving adapter,
    assert run["reference"]["model"] == "start"  # which is also the frozen reference KTO compares against
    read = run["feedback"]
    assert read["method"] == "kto" and read["count"] == 4 and read["examples"] == 4
    assert {read["first_id"], read["last_id"]} <= set(ids[:4]) and len(read["ids_sha256"]) == 64
    assert read["skipped"]["count"] == 0 and run["outcome"] == "succeeded"
    assert [m for m in done["metrics"] if m.get("run") == 2 and "rewards/chosen" in m]
    shown = invoke(server_uri, db, "logs", "fb_kto")  # the feedback run's rewards, as `logs --follow` shows them live
    words = " ".join(shown.output.split())  # as wide as the terminal: the line may wrap anywhere
    assert shown.exit_code == 0 and "rewards: chosen" in words and "margin" in words, shown.output
    started = [e for e in done["events"] if e.get("kind") == "retrain_requested"]
    assert [e.get("trigger") for e in started] == ["feedback"]  # one start, whichever daemon won

    # A rating written now counts toward the run after 2: some daemon has made a full pass since, and no third run.
    requests.update_one({"_id": ids[4]}, {"$set": {"feedback": {"rating": 1}}})
    wait_until(lambda: requests.find_one({"_id": ids[4], "feedback_run": 2}), 60, "the new rating counted")
    assert db[defaults.MODELS].find_one({"_id": "fb_kto"})["run"] == 2
    # The listener never touched what the raters wrote.
    assert requests.find_one({"_id": ids[1]})["feedback"] == {"rating": -1, "better": "Arr, the sea be deep."}
    assert requests.find_one({"_id": ids[3]})["feedback"] == {"rating": -0.5}

    requests.insert_one(request("fb_kto_after", "fb_kto", "and now?"))
    answer = settled(db, "fb_kto_after")
    assert answer["status"] == "done" and answer["checkpoint_used"] == done["best_checkpoint"]
    assert done["best_checkpoint"]["run"] == 2


def test_the_cli_says_in_one_line_what_it_cannot_rate(module_samples, server_uri):
    db = module_samples
    db[defaults.REQUESTS].insert_many([{**request(7, "cli_m", "hi"), "status": "done", "output": "yo"},
                                       {**request("pending_one", "cli_m", "hi"), "status": "pending"}])
    for args, message in ((("cli_m", "nope", "--good"), "no request with _id 'nope'"),
                          (("other", "7", "--good"), "is for another model"),
                          (("cli_m", "pending_one", "--bad"), "not done yet"),
                          (("cli_m", "7"), "say --good or --bad")):
        result = invoke(server_uri, db, "feedback", *args)
        assert result.exit_code != 0 and message in result.output, result.output
    assert invoke(server_uri, db, "feedback", "cli_m", "7", "--good").exit_code == 0  # the integer id
    assert db[defaults.REQUESTS].find_one({"_id": 7})["feedback"] == {"rating": 1}
    # Where an integer and a text read alike, none is rated; extended JSON names the one meant, as for a model.
    db[defaults.REQUESTS].insert_many([{**request(8, "cli_m", "hi"), "status": "done", "output": "yo"},
                                       {**request("8", "cli_m", "hi"), "status": "done", "output": "yo"}])
    for args, message in ((("cli_m", "8", "--bad"), "give the exact one as extended JSON"),
                          (("cli_m", '{"$oid": "zz"}', "--bad"), "is not a request id")):
        result = invoke(server_uri, db, "feedback", *args)
        assert result.exit_code != 0 and message in result.output and result.output.count("\n") <= 2, result.output
    assert db[defaults.REQUESTS].count_documents({"feedback": {"$exists": True}, "_id": {"$in": [8, "8"]}}) == 0
    assert invoke(server_uri, db, "feedback", "cli_m", '{"$numberInt": "8"}', "--bad").exit_code == 0
    assert db[defaults.REQUESTS].find_one({"_id": 8})["feedback"] == {"rating": -1}
    assert "feedback" not in db[defaults.REQUESTS].find_one({"_id": "8"})


@pytest.mark.parametrize("meanwhile", [{"status": "pending"}, {"model": "other"}], ids=["requeued", "moved"])
def test_listener_feedback_rates_nothing_when_the_request_changes_between_its_read_and_its_write(db, meanwhile):
    """A user who rates a request with `listener feedback` while it is requeued (or rewritten for another model)
    expects no rating on what is no longer that model's answer, and one line saying so."""
    requests = db[defaults.REQUESTS]
    requests.insert_one({**request(7, "victim", "hi"), "status": "done", "output": "yo"})
    found = rating_command.done_request(requests, "victim", "7")
    requests.update_one({"_id": 7}, {"$set": meanwhile})
    with pytest.raises(click.ClickException) as refused:
        rating_command.rate(requests, found, "victim", {"rating": 1}, "7")
    assert "changed while it was being rated" in refused.value.format_message()
    assert "\n" not in refused.value.format_message()
    assert "feedback" not in requests.find_one({"_id": 7})


def test_dpo_feedback_waits_for_pairs_then_trains_on_corrections_and_opposite_ratings(module_samples, both_daemons,
                                                                                     tiny_model_path):
    db, (daemon, second) = module_samples, both_daemons
    served(db, "fb_dpo", tiny_model_path, feedback={"method": "dpo", "every": 2})
    answered(db, "fb_dpo", "one", {"rating": 1})
    answered(db, "fb_dpo", "two", {"rating": 1})  # two ratings, both good, of two prompts: no pair
    wait_until(lambda: "too few usable" in daemon.log() + second.log(), 60, "a daemon seeing no pairs")
    assert db[defaults.MODELS].find_one({"_id": "fb_dpo"})["run"] == 1
    answered(db, "fb_dpo", "three", {"rating": -1, "better": "a better three"})  # a correction: one pair
    answered(db, "fb_dpo", "two", {"rating": -1})  # opposite to the good "two": another pair
    run = feedback_run(db, "fb_dpo")["runs"][1]
    assert run["trigger"] == "feedback" and run["method"] == "dpo"
    assert run["feedback"]["pairs"] == 2 and run["feedback"]["count"] == 4


def test_a_feedback_runs_forgetting_guard_scores_the_models_own_held_out_documents(module_samples, both_daemons,
                                                                                    tiny_model_path):
    db = module_samples
    served(db, "fb_guard", tiny_model_path, feedback={"method": "kto", "every": 12})
    for n in range(12):  # 12 examples: one is held out, so the gate scores the run
        answered(db, "fb_guard", f"guard {n}", {"rating": 1 if n % 2 else -1})
    promotion = feedback_run(db, "fb_guard")["runs"][1]["promotion"]
    # Not the held-out rating's answer: the model's own SFT documents, the 20 of its 200 its SFT runs hold out.
    assert promotion["forgetting_on"] == {"source": "data", "collection": "pirate_chat"}
    assert promotion["documents"] == 20 and promotion["examples"] == 1
    assert promotion["metric"] == "eval_loss"  # the sft model's own metric, measured on them
    candidate, serving = promotion["scores"]["candidate"], promotion["scores"]["serving"]
    assert candidate["tokens"] == serving["tokens"] > 0
    assert promotion["score"] == candidate["eval_loss"] and promotion["serving_score"] == serving["eval_loss"]


def start_feedback_run(server_uri, db, model_id, after: int) -> bool:
    """What a daemon does once its count says a feedback run is due (`retrain.start`)."""
    async def run():
        client = AsyncMongoClient(server_uri, tz_aware=True)
        try:
            return await retrain.start(client[db.name][defaults.MODELS], model_id, after, "feedback")
        finally:
            await client.close()
    return asyncio.run(run())


def test_ratings_gone_by_the_time_a_run_reads_them_end_it_without_training_and_counting_goes_on(
        module_samples, both_daemons, tiny_model_path, server_uri, model_root, tmp_path):
    db, (_, second) = module_samples, both_daemons
    first = served(db, "fb_gone", tiny_model_path, feedback={"method": "kto", "every": 2})
    kept = answered(db, "fb_gone", "still here", {"rating": 1})
    wait_until(lambda: db[defaults.REQUESTS].find_one({"_id": kept["_id"], "feedback_run": 1}), 60, "a count")
    # A daemon counted two ratings and started run 2; a rater deleted one before the run read them.
    assert start_feedback_run(server_uri, db, "fb_gone", 1)
    done = feedback_run(db, "fb_gone")
    run = done["runs"][1]
    assert run["outcome"] == "nothing_to_train" and run["trigger"] == "feedback", run
    assert run["feedback"]["count"] == 1 and run["feedback"]["examples"] == 1
    assert "needs at least 2" in run["nothing_to_train"]
    assert done["best_checkpoint"] == first["best_checkpoint"] and "error" not in done and "trigger" not in done
    assert [e["run"] for e in done["events"] if e["kind"] == "nothing_to_train"] == [2]
    assert not [c for c in done["checkpoints"] if c["run"] == 2]

    # A daemon restarted meanwhile loses nothing: the count is in the requests. The next ratings start run 3, once.
    second.stop()
    answered(db, "fb_gone", "one more", {"rating": -1})
    answered(db, "fb_gone", "and one more", {"rating": 1})
    restarted = DaemonProcess(server_uri, db.name, tmp_path, "restarted", 4, env=DAEMON_ENV, model_root=model_root)
    try:
        done = wait_for(db[defaults.MODELS], "fb_gone", lambda d: d.get("run") == 3 and finished(d), timeout_s=600)
        assert done["status"] == "succeeded", done.get("error")
        assert done["runs"][2]["outcome"] == "succeeded" and done["runs"][2]["feedback"]["examples"] == 3
        assert done["best_checkpoint"]["run"] == 3
        started = [e for e in done["events"] if e.get("kind") == "retrain_requested"]
        assert [e.get("trigger") for e in started] == ["feedback", "feedback"]  # runs 2 and 3, one start each
    finally:
        restarted.stop()


def test_a_models_own_preference_run_with_too_few_rows_still_fails(db):
    """Only a feedback run ends without training: a model's own data is its writer's to fix."""
    db["rated"].insert_one({"p": "hi", "c": "yo", "l": 1})
    data = parse_model({**BASE, "data": {"collection": "rated", "key": ["p", "c", "l"]}, "method": "kto"}).data
    with pytest.raises(SpecError) as refused:
        preferences.read_datasets(db, data, "kto", Limits())
    assert refused.value.field == "data.key"


WRONG_SHAPES = [{"rating": "1"}, {"rating": 7}, {"rating": {"$gt": 0}}, "great", {"rating": True},
                {"rating": float("nan")}, {"rating": 1, "better": "x" * 40_000}, {"rating": 1, "by": "me"},
                {"rating": -1, "better": 5}, ["rating", 1], {"better": "only"}]


def test_feedback_of_every_wrong_shape_is_skipped_and_counted_beside_good_feedback(module_samples, both_daemons,
                                                                                   tiny_model_path):
    db = module_samples
    served(db, "fb_shapes", tiny_model_path, feedback={"method": "kto", "every": 3})
    for n, wrong in enumerate(WRONG_SHAPES):
        answered(db, "fb_shapes", f"wrong {n}", wrong)
    for n, good in enumerate([1, -1, 0.25]):
        answered(db, "fb_shapes", f"good {n}", {"rating": good})
    done = feedback_run(db, "fb_shapes")
    read = done["runs"][1]["feedback"]
    assert read["examples"] == 3
    # The server selects only ratings of a shape a run uses (`feedback.usable`): the rest are never read or counted.
    assert read["count"] == 3 and read["skipped"]["count"] == 0


def one_pass(server_uri, db, spec, state: dict) -> list:
    """What one retrain check's feedback pass finds due, run in-process as a daemon runs it."""
    async def run():
        client = AsyncMongoClient(server_uri, tz_aware=True)
        try:
            trigger = FeedbackTrigger(client[db.name], Limits(), 10, SkipLog(), "d")
            return await trigger.due({"k": (spec, parse(ModelState, state))})
        finally:
            await client.close()
    return asyncio.run(run())


def test_a_feedback_filter_only_narrows_to_the_models_own_answers(db, server_uri):
    spec = parse_model({"_id": "mine", "model_name_or_path": "org/name", "data": {"collection": "notes"},
                        "feedback": {"method": "kto", "every": 2,
                                     "filter": {"$or": [{"model": "theirs"}, {"tag": "keep"}]}}})
    theirs = [answered(db, "theirs", f"their {n}", {"rating": 1}) for n in range(3)]
    kept = [answered(db, "mine", f"kept {n}", {"rating": 1}) for n in range(2)]
    requests = db[defaults.REQUESTS]
    requests.update_many({"_id": {"$in": [d["_id"] for d in theirs + kept]}}, {"$set": {"tag": "keep"}})
    untagged = answered(db, "mine", "untagged", {"rating": -1})
    requests.insert_one({**request("pending_mine", "mine", "x"), "feedback": {"rating": 1}, "tag": "keep"})  # unanswered
    selected = feedback.rated_requests(db, spec, Limits())
    assert sorted(d["input"] for d in selected) == ["kept 0", "kept 1"]
    assert set(selected[0]) <= set(feedback.FIELDS)  # only what a run reads of a request

    # A daemon's pass counts the two toward the run after 1, passes over the one the filter leaves out (looked at
    # once), and stamps nothing of another model's or unanswered.
    assert [s.id for s in one_pass(server_uri, db, spec, {"_id": "mine", "status": "succeeded", "run": 1})] == ["mine"]
    stamps = {d["_id"]: d.get("feedback_run") for d in requests.find({}, {"feedback_run": 1})}
    assert [stamps[d["_id"]] for d in kept] == [1, 1] and stamps[untagged["_id"]] == feedback.PASSED_OVER
    assert all(stamps[d["_id"]] is None for d in theirs) and stamps["pending_mine"] is None
    # While the run is pending nothing is stamped; once it trains, new ratings count toward the run after it.
    late = answered(db, "mine", "late", {"rating": 1})
    requests.update_one({"_id": late["_id"]}, {"$set": {"tag": "keep"}})
    assert one_pass(server_uri, db, spec, {"_id": "mine", "status": "pending", "run": 1}) == []
    assert "feedback_run" not in requests.find_one({"_id": late["_id"]})
    assert one_pass(server_uri, db, spec, {"_id": "mine", "status": "running", "run": 2}) == []
    assert requests.find_one({"_id": late["_id"]})["feedback_run"] == 2
    # A stamp written by anyone on what is not a rating counts for nothing.
    requests.insert_one({**request("forged", "mine", "x"), "status": "done", "output": "y", "tag": "keep",
                         "feedback_run": 2})
    assert one_pass(server_uri, db, spec, {"_id": "mine", "status": "succeeded", "run": 2}) == []


@pytest.mark.parametrize(("given", "field"), [
    ({"method": "sft", "every": 2}, "feedback.method"), ({"method": "kto", "every": 0}, "feedback.every"),
    ({"method": "kto"}, "feedback.every"), ({"method": "kto", "every": 2, "filter": {"$where": "1"}}, "feedback.filter"),
    ({"method": "kto", "every": 2, "filter": {"$expr": {"$eq": [1, 1]}}}, "feedback.filter"),
    ({"method": "kto", "every": 2, "filter": {"x": "y" * 20_000}}, "feedback.filter"),
    ({"method": "kto", "every": 2, "by": "me"}, "feedback.by"), ({"method": "kto", "every": 2001}, "feedback.every"),
])
def test_a_models_feedback_is_allowlisted_and_bounded(given, field):
    with pytest.raises(SpecError) as refused:
        parse_model({**BASE, "feedback": given})
    assert refused.value.field == field
    assert parse_model({**BASE, "feedback": {"method": "dpo", "every": 2001}},
                       Limits(max_feedback_rows=5000)).feedback.every == 2001


def test_the_trainer_must_fit_the_feedback_method_too():
    with pytest.raises(SpecError) as refused:
        parse_model({**BASE, "trainer": {"packing": True}, "feedback": {"method": "dpo", "every": 2}})
    assert refused.value.field == "trainer.packing" and "feedback runs train with method dpo" in str(refused.value)
    with pytest.raises(SpecError) as refused:
        parse_model({**BASE, "trainer": {"per_device_train_batch_size": 1}, "feedback": {"method": "kto", "every": 2}})
    assert refused.value.field == "trainer.per_device_train_batch_size"
    assert parse_model({**BASE, "trainer": {"packing": True}}).feedback is None


@pytest.mark.parametrize("given", [{"rating": 1}, "junk", {"rating": {"$gt": 0}}, [1, 2], None])
def test_a_request_with_any_feedback_parses(given):
    assert parse_request({**request("r", "m", "hi"), "feedback": given}).feedback == given


def test_what_a_run_keeps_of_a_request_stays_within_the_input_caps():
    limits = Limits(max_input_chars=100, max_messages=3)
    chat = [{"role": "user", "content": "hi"}]
    requests = [{"_id": 1, "input": "p", "output": "o" * 101, "feedback": {"rating": 1}},
                {"_id": 2, "input": chat * 4, "output": "o", "feedback": {"rating": 1}},
                {"_id": 3, "input": "p" * 101, "output": "o", "feedback": {"rating": 1}},
                {"_id": 4, "input": chat * 3, "output": "o", "feedback": {"rating": -1, "better": "b"}},
                {"_id": 5, "input": "p", "output": "o", "feedback": {"rating": 0.5}}]
    built, reasons = feedback.sources(requests, "kto", limits)
    assert [row["_id"] for row in built] == [4, 5] and reasons == {feedback.UNUSABLE: 3}
    pairs, _ = feedback.sources(requests, "dpo", limits)
    assert pairs == [{"_id": 4, "input": chat * 3, "chosen": "b", "rejected": "o"}]


def test_a_daemon_counts_feedback_for_at_most_its_bound_of_models_those_seen_first_keeping_their_places(db, server_uri):
    def spec(name):
        return parse_model({**BASE, "_id": name, "feedback": {"method": "kto", "every": 1}})

    def rated(name):
        answered(db, name, f"{name} asked", {"rating": 1})
        answered(db, name, f"{name} asked again", {"rating": -1})

    async def passes():
        client = AsyncMongoClient(server_uri, tz_aware=True)
        try:
            trigger = FeedbackTrigger(client[db.name], Limits(), 2, SkipLog(), "d")
            models = {n: (spec(n), parse(ModelState, {"_id": n, "status": "succeeded", "run": 1})) for n in "yz"}
            first = await trigger.due(models)
            models["a"] = (spec("a"), parse(ModelState, {"_id": "a", "status": "succeeded", "run": 1}))
            return first, await trigger.due(models)  # "a" sorts first, but comes last
        finally:
            await client.close()
    for name in "ayz":
        rated(name)
    first, second = asyncio.run(passes())
    assert [s.id for s in first] == ["y", "z"] and [s.id for s in second] == ["y", "z"]
    assert db[defaults.REQUESTS].count_documents({"model": "a", "feedback_run": {"$exists": True}}) == 0


class RatedReads(monitoring.CommandListener):
    """How many whole rated requests (`feedback.FIELDS`) the server sent a client, by its replies to finds and their
    getMores: what a daemon read to see whether ratings make a run."""

    def __init__(self):
        self.documents, self.cursors, self.reading = 0, set(), set()

    def started(self, event):
        command = event.command
        if (event.command_name == "find" and command.get("projection") == feedback.FIELDS
                or event.command_name == "getMore" and command["getMore"] in self.cursors):
            self.reading.add(event.request_id)

    def succeeded(self, event):
        if event.request_id in self.reading:
            cursor = event.reply["cursor"]
            self.documents += len(cursor.get("firstBatch", cursor.get("nextBatch", [])))
            self.cursors.add(cursor["id"])

    def failed(self, event):
        pass


@pytest.mark.parametrize("method, most_read", [("kto", ENOUGH_BATCH), ("dpo", 3 * ENOUGH_BATCH)])
def test_a_due_check_reads_ratings_only_until_they_make_a_run(db, server_uri, method, most_read):
    """A user expects a model with thousands of ratings to cost each retrain pass what it takes to see its run is
    due, not every rating up to MONGOTUNE_MAX_FEEDBACK_ROWS: 500 ratings here, where KTO's first batch of thumbs
    makes a run, and DPO's corrections start after the newest 150 ratings (no pairs among them)."""
    start = defaults.now()
    db[defaults.REQUESTS].insert_many([
        {"model": "victim", "input": f"q {n}", "status": "done", "output": "a",
         "completed_at": start + dt.timedelta(seconds=n),
         "feedback": {"rating": 1} if n >= 350 else {"rating": -1, "better": "b"}} for n in range(500)])
    reads = RatedReads()
    assert due(server_uri, db, spec_of(method, every=500), listeners=(reads,)) == ["victim"]
    assert 0 < reads.documents <= most_read, reads.documents


def test_class3_slow_models_take_one_turn_a_pass_between_them_longest_waiting_first(db, server_uri):
    """A writer's `feedback.filter`s that scan long (on MongoDB up to QUERY_MS a query; the embedded server ignores
    maxTimeMS) must not hold up every other model's counting, pass after pass: a model whose turn was slow takes one
    turn among the slow ones each pass. Here every turn counts as slow (`slow_s=0`), so the scheduling shows alone:
    after the first pass, one model a pass, in turn."""
    names = ["p", "q", "r"]

    def visited() -> set[str]:
        """The models whose newest rating was stamped: those that had a turn since it was written."""
        return {name for name in names if db[defaults.REQUESTS].find_one(
            {"model": name}, sort=[("_id", -1)]).get("feedback_run") is not None}

    async def passes() -> list[set[str]]:
        client = AsyncMongoClient(server_uri, tz_aware=True)
        try:
            trigger = FeedbackTrigger(client[db.name], Limits(), 10, SkipLog(), "d", slow_s=0)
            models = {n: (parse_model({**BASE, "_id": n, "feedback": {"method": "kto", "every": 100}}),
                          parse(ModelState, {"_id": n, "status": "succeeded", "run": 1})) for n in names}
            seen = []
            for n in range(5):
                for name in names:
                    answered(db, name, f"{name} asked in pass {n}", {"rating": 1})
                await trigger.due(models)
                seen.append(visited())
            return seen
        finally:
            await client.close()

    assert asyncio.run(passes()) == [{"p", "q", "r"}, {"p"}, {"q"}, {"r"}, {"p"}]


def test_class1_listener_feedback_rates_a_request_another_writer_planted_under_a_look_alike_id(db, server_uri):
    """A user who rates their own request "42" (a string id) with `listener feedback` expects that request rated:
    another writer's done request with `_id: 42` (an integer) for the same model is tried first, so the user's
    rating endorses the other writer's answer, and their own stays unrated. Identity must stay exact (issue 21,
    class 7): an id that matches requests of several types is refused, naming them."""
    rated(db, "victim", "my question", None, _id="42")
    rated(db, "victim", "planted question", None, _id=42, output="the answer the planter wants endorsed")
    result = CliRunner().invoke(cli, ["feedback", "--uri", server_uri, "--db", db.name, "victim", "42", "--good"])
    planted = db[defaults.REQUESTS].find_one({"_id": 42})
    assert planted.get("feedback") is None, result.output
    assert result.exit_code != 0 and "2 requests have an _id that reads '42' (int, str)" in result.output, result.output
    assert db[defaults.REQUESTS].find_one({"_id": "42"}).get("feedback") is None


def test_class2_one_rating_of_a_shape_the_server_cannot_return_stops_every_later_rating_counting(db, server_uri):
    """A user expects one odd rating (here a `better` nested ~500 deep, which the embedded server stores but cannot
    return; on MongoDB, a request just under 16 MB that the stamp would push over) to be skipped, and the model's
    other ratings to start its run."""
    rated(db, "victim", "poison", {"rating": 1, "better": nested_document(500)})
    for n, rating in enumerate([1, -1, 1]):
        rated(db, "victim", f"honest {n}", {"rating": rating})
    assert due(server_uri, db, spec_of(every=3)) == ["victim"]
    honest = db[defaults.REQUESTS].count_documents({"input": {"$regex": "^honest"}, "feedback_run": 1})
    assert honest == 3


def test_ratings_written_as_a_pass_decides_count_toward_the_run_they_start_not_the_next(db, server_uri):
    """A user expects one run per `every` new ratings. Two ratings written between a pass's stamping and its check that
    the ratings make a run are read by that check (and the run it starts) but were stamped only once the run was
    claimed, with its number: so they also counted toward the next run, which started at once with no new rating."""
    for n, rating in enumerate([1, -1]):
        rated(db, "victim", f"first {n}", {"rating": rating})

    async def one_pass():
        client = AsyncMongoClient(server_uri, tz_aware=True)
        try:
            trigger = FeedbackTrigger(client[db.name], Limits(), 10, SkipLog(), "d")
            checked = trigger._enough

            async def written_meanwhile(spec):  # two raters write as the pass reads
                for n, rating in enumerate([1, -1]):
                    rated(db, "victim", f"meanwhile {n}", {"rating": rating})
                return await checked(spec)

            trigger._enough = written_meanwhile
            spec = spec_of(every=2)
            state = parse(ModelState, {"_id": "victim", "status": "succeeded", "run": 1})
            return [s.id for s in await trigger.due({"victim": (spec, state)})]
        finally:
            await client.close()

    assert asyncio.run(one_pass()) == ["victim"]
    stamps = [d.get("feedback_run") for d in db[defaults.REQUESTS].find({}, sort=[("input", 1)])]
    assert stamps == [1, 1, 1, 1], "the run these four start is the run they count toward"


def test_class2_a_rating_whose_completed_at_the_server_cannot_sort_on_stops_nothing_of_its_models(db, server_uri):
    """A user expects the model's other ratings to start its run whatever a writer puts in a rated request's
    `completed_at` (the listener's field, which the newest-first read sorts on): nested ~500 deep, the embedded server
    stores it but fails that sorted read, so the check that the ratings make a run failed at every pass."""
    rated(db, "victim", "poison", {"rating": 1}, completed_at=nested_document(500))
    for n, rating in enumerate([1, -1, 1]):
        rated(db, "victim", f"honest {n}", {"rating": rating})
    assert due(server_uri, db, spec_of(every=3)) == ["victim"]
    assert feedback.rated_requests(db, spec_of(every=3), Limits()), "the run reads the honest ratings"


def test_class2_one_rating_with_a_role_of_the_wrong_type_stops_the_feedback_pass_of_every_later_model(
        db, server_uri):
    """A user expects another user's odd request to cost nothing but that request: on a database without the
    write-time validator (`--no-validators`, or a server or role that refuses it, which the README says only loses
    the early check), a rated answer whose chat has a role that is an object makes the pass raise TypeError
    (unhashable) for its model, and no model counted after it in the pass (here the victim's) ever starts a run."""
    rated(db, "a_first", [{"role": {"any": "thing"}, "content": "hi"}], {"rating": 1})
    rated(db, "a_first", "fine", {"rating": -1})
    honest_ratings(db)
    attacker = parse_model({**BASE, "_id": "a_first", "feedback": {"method": "kto", "every": 2}})
    assert "victim" in due(server_uri, db, attacker, spec_of(every=2))


def test_class3_a_raters_huge_request_id_is_copied_whole_into_the_models_run_entry(db, server_uri):
    """A user expects a run's entry to stay small whatever ids raters give their requests: a 4 MB string `_id`
    (MongoDB has no bound on it) lands whole in the victim's document as `first`, and a few runs fill its 16 MB."""
    for n, rating in enumerate([1, -1, 1, -1]):
        rated(db, "victim", f"honest {n}", {"rating": rating})
    rated(db, "victim", "newest", {"rating": 1}, _id="x" * 4_000_000)
    entry = run_entry(db, spec_of())
    sizes = {end: len(bson.encode({"_id": entry[end]})) for end in ("first_id", "last_id")}
    assert max(sizes.values()) <= MAX_REQUEST_ID_BYTES, sizes


@pytest.mark.parametrize("request_fields", [
    {"feedback": {"rating": 1, "note": "x" * 50_000}},  # an unknown field of the rating: skipped only after
    {"input": {"text": "x" * 50_000}},  # an input of no shape a request has counts 0 characters
    {"input": [{"role": "user", "content": "hi", "pad": "x" * 50_000}]},  # a message's other fields count nothing
    {"feedback": {"rating": 1, "better": ["x" * 1_000] * 50}},  # a list of texts counts one character each
])
def test_class3_what_a_daemon_keeps_of_a_rated_request_is_not_bounded_by_the_input_caps(request_fields):
    """A user expects the daemon to hold at most what the operator's caps allow of each rated request (`_enough`
    keeps up to `max_feedback_rows` of them in the daemon's memory): 50,000 characters pass a 100-character cap
    here, so 2,000 requests of 16 MB each would be 32 GB in the daemon that serves everyone."""
    doc = {"_id": 1, "input": "p", "output": "o", "feedback": {"rating": 1}, **request_fields}
    assert feedback.too_long(doc, Limits(max_input_chars=100))


def test_class3_one_pass_stamps_a_whole_flood_of_one_models_ratings(db, server_uri):
    """A user expects the retrain pass, which every model's retrain and feedback starts wait behind, to do bounded
    work for any one model: a writer's flood of ratings is stamped in one unbounded `update_many` (20,000 took 5.6 s
    on the embedded server here, inserting them 2.3 s: a million, about 5 minutes in which no model's run starts),
    though `every` and a run's read are both capped at `MONGOTUNE_MAX_FEEDBACK_ROWS`, so no more need counting."""
    limits = Limits(max_feedback_rows=5)
    db[defaults.REQUESTS].insert_many([
        {"model": "flood", "input": f"q {n}", "status": "done", "output": "a", "feedback": {"rating": 1}}
        for n in range(50)])
    spec = parse_model({**BASE, "_id": "flood", "feedback": {"method": "kto", "every": 5}}, limits)
    due(server_uri, db, spec, limits=limits)
    stamped = db[defaults.REQUESTS].count_documents({"model": "flood", "feedback_run": {"$exists": True}})
    assert stamped <= limits.max_feedback_rows, stamped


def state(name, status: str = "succeeded", run: int = 1) -> ModelState:
    """A model's state as a pass sees it."""
    return parse(ModelState, {"_id": name, "status": status, "run": run})


def other(name: str) -> ModelSpec:
    """Another writer's model with `feedback`."""
    return parse_model({**BASE, "_id": name, "feedback": {"method": "kto", "every": 2}})


def restarts(server_uri, db, *lives: list, max_models: int = 1) -> list:
    """The ids the last feedback pass finds due. Each of `lives` is one life of the daemon "d" (a fresh
    `FeedbackTrigger`, as after a restart), a list of its passes, each the models it sees (`{key: (spec, state)}`),
    or a callable run between them (ratings written meanwhile)."""
    async def run():
        client = AsyncMongoClient(server_uri, tz_aware=True)
        try:
            found = []
            for passes in lives:
                trigger = FeedbackTrigger(client[db.name], Limits(), max_models, SkipLog(), "d")
                for step in passes:
                    if callable(step):
                        step()
                    else:
                        found = [spec.id for spec in await trigger.due(step)]
            return found
        finally:
            await client.close()
    return asyncio.run(run())


def honest_ratings(db) -> None:
    """Two ratings of "victim" from its own users: enough for a KTO run of `every: 2`."""
    for n, rating in enumerate([1, -1]):
        rated(db, "victim", f"honest {n}", {"rating": rating})


def test_class3_failed_models_hold_every_place_of_the_feedback_count(db, server_uri):
    """A user expects a place among the `MONGOTUNE_RETRAIN_MAX_MODELS` models a daemon counts feedback for to go to
    models that can count, as it does for `retrain` (failed and cancelled models hold none there): models with
    `feedback` that failed (an insert each, no training) keep every place, and a live model seen later is never
    counted."""
    honest_ratings(db)
    dead = {name: (other(name), state(name, "failed")) for name in ("dead1", "dead2")}
    life = [dead, {**dead, "victim": (spec_of(), state("victim"))}]
    assert restarts(server_uri, db, life, max_models=2) == ["victim"]


def test_class4_ratings_no_run_can_read_count_toward_every(db, server_uri):
    """A user expects `feedback: {every: 4}` to start a run once 4 ratings it can train on were written: 2 good
    ones and 2 of a shape every run skips (an unknown field) start it now, on 2 examples."""
    rated(db, "victim", "good", {"rating": 1})
    rated(db, "victim", "bad", {"rating": -1})
    rated(db, "victim", "junk 1", {"rating": 1, "junk": True})
    rated(db, "victim", "junk 2", {"rating": -1, "better": 7})
    assert due(server_uri, db, spec_of(every=4)) == []


def test_class1_a_raters_request_id_nested_deep_makes_the_models_document_unreadable(module_samples, module_daemon,
                                                                                     tiny_model_path, limits):
    """A user expects ratings others write to never break their model: a rated request whose `_id` is a document 98
    levels deep (MongoDB stores it: 100 is its limit) is copied into the feedback run's entry as `first`, and the
    model's document then nests deeper than the daemon reads it (`runs`): seen here, its requests then fail
    `model_unavailable` and its next run fails `invalid_document`, field `runs`."""
    db = module_samples
    db[defaults.MODELS].insert_one(model("deep_id", tiny_model_path, feedback={"method": "kto", "every": 3}))
    first = wait_for(db[defaults.MODELS], "deep_id", finished, timeout_s=600)
    assert first["status"] == "succeeded", first.get("error")
    # A rating whose id is not plain is never counted or read, so three honest ones start the run.
    rated(db, "deep_id", "deep", {"rating": 1}, _id=nested_document(98))
    for n, rating in enumerate([1, -1, 1]):
        rated(db, "deep_id", f"honest {n}", {"rating": rating})
    done = wait_for(db[defaults.MODELS], "deep_id", lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    parse_model(done, limits)  # what every daemon does with the model document (its model root allowed)


def test_class4_a_feedback_filter_the_server_refuses_is_never_told_to_its_writer(module_db, module_daemon):
    """A user expects a `feedback.filter` the server refuses to be named to them, as a refused `data.filter` of
    `retrain` is (the model's `warnings`), not only logged while the model waits for ratings forever."""
    db = module_db
    for name, query in (("silent", {"input": {"$regex": "("}}), ("zz_control", {"input": {"$exists": True}})):
        db[defaults.MODELS].insert_one({**BASE, "_id": name, "status": "succeeded", "run": 1,
                                        "feedback": {"method": "kto", "every": 1, "filter": query}})
        rated(db, name, "hello", {"rating": 1})
    # The pass takes models in the order first seen, by id: once the control's rating is stamped, "silent" was tried.
    wait_for(db[defaults.REQUESTS], db[defaults.REQUESTS].find_one({"model": "zz_control"})["_id"],
             lambda d: d.get("feedback_run") == 1, timeout_s=60)
    warnings = db[defaults.MODELS].find_one({"_id": "silent"}).get("warnings") or []
    assert any("feedback.filter" in w for w in warnings), warnings


# Chat templates that refuse roles out of turn, as Llama 2's, Mistral's and Gemma's do.
STRICT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_template(tiny_model_path: str, name: str, template: str | None) -> str:
    """A copy of the tiny model with another chat template, or none (as a base model has)."""
    folder = Path(tiny_model_path).parent / name
    if not folder.exists():
        shutil.copytree(tiny_model_path, folder)
        config = folder / "tokenizer_config.json"
        settings = json.loads(config.read_text())
        settings.pop("chat_template", None)
        if template is not None:
            settings["chat_template"] = template
            (folder / "chat_template.jinja").write_text(template)
        else:
            (folder / "chat_template.jinja").unlink(missing_ok=True)
        config.write_text(json.dumps(settings))
    return str(folder)


def strict_model(tiny_model_path: str) -> str:
    """The tiny model with a chat template that refuses two turns of one role in a row."""
    return with_template(tiny_model_path, "strict_tiny", STRICT_TEMPLATE)


def test_class2_one_raters_chat_out_of_turn_fails_the_models_feedback_run(module_samples, module_daemon,
                                                                          tiny_model_path):
    """A user expects a rating whose chat the model's template refuses (two user turns in a row) to be skipped and
    counted like any rating of a wrong shape, and the run to train on the others: it fails the whole run."""
    db = module_samples
    db[defaults.MODELS].insert_one(model("strict", strict_model(tiny_model_path),
                                         feedback={"method": "kto", "every": 5}))
    first = wait_for(db[defaults.MODELS], "strict", finished, timeout_s=600)
    assert first["status"] == "succeeded", first.get("error")
    for n, rating in enumerate([1, -1, 1, -1]):
        rated(db, "strict", f"honest {n}", {"rating": rating})
    rated(db, "strict", [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}], {"rating": 1})
    done = wait_for(db[defaults.MODELS], "strict", lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")


# --- attack findings fixed by a feedback run that ends nothing_to_train and by the guard on the model's data ---

def assert_waits(db, name: str, document: dict, unusable: list) -> None:
    """`document` (a model with `feedback: {method: kto, every: 2}`) trained, then rated with `unusable` inputs
    only: its feedback run waits, or ends `nothing_to_train`, and the model serves on, never failed. A second model like it, rated with usable text and counted after it in each
    pass, shows that a pass went by."""
    control = f"{name}_zz"
    for doc_id in (name, control):
        db[defaults.MODELS].insert_one({**document, "_id": doc_id})
    for doc_id in (name, control):
        first = wait_for(db[defaults.MODELS], doc_id, finished, timeout_s=600)
        assert first["status"] == "succeeded", first.get("error")
    for prompt, rating in zip(unusable, [1, -1]):
        rated(db, name, prompt, {"rating": rating})
    for n, rating in enumerate([1, -1]):
        rated(db, control, f"short {n}", {"rating": rating})
    wait_for(db[defaults.MODELS], control, lambda d: d.get("run") == 2 or d.get("status") != "succeeded",
             timeout_s=120)
    after = db[defaults.MODELS].find_one({"_id": name})
    if after["run"] != 1:  # it started (the daemon cannot tell which rows the tokenizer will drop): it trained nothing
        after = wait_for(db[defaults.MODELS], name, lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
        assert after["runs"][-1].get("outcome") == "nothing_to_train", after["runs"][-1]
    assert after["status"] == "succeeded" and "error" not in after, after.get("error")
    assert after["best_checkpoint"]["run"] == 1, "what served serves on"


FEEDBACK = {"feedback": {"method": "kto", "every": 2}}


def test_class2_two_ratings_of_prompts_longer_than_max_length_fail_the_model(module_samples, module_daemon,
                                                                         tiny_model_path):
    """A user expects a feedback run to fail nothing when every rated answer it reads has a prompt that fills
    `trainer.max_length` (trl drops such rows): two such ratings, within the input caps, started the run and failed
    the model, which then took no feedback run until its owner set it back to pending."""
    assert_waits(module_samples, "long", model("long", tiny_model_path, **FEEDBACK),
                 [f"{n} " + "ahoy matey " * 200 for n in range(2)])


def test_class2_two_chat_ratings_fail_a_base_model_without_a_chat_template(module_samples, module_daemon,
                                                                          tiny_model_path):
    """A user expects a feedback run to fail nothing for ratings it cannot use: on a base model (no chat template) the
    daemon's check counts chat ratings as usable, the run then skips them all, and the model ended `failed` naming
    `feedback` after two ratings written as chat, as any driver may write a request's input."""
    base_only = {**model("base_only", with_template(tiny_model_path, "templateless_tiny", None), **FEEDBACK),
                 "data": {"collection": "pirate_text", "key": "text"}}
    assert_waits(module_samples, "base_only", base_only,
                 [[{"role": "user", "content": f"ahoy {n}"}] for n in range(2)])




def test_class1_a_feedback_runs_forgetting_guard_measures_only_the_raters_answers(module_samples, module_daemon,
                                                                                tiny_model_path):
    """A user expects the gate's forgetting guard to measure "the SFT eval loss on the model's own held-out documents
    so that a preference run cannot quietly forget what it knew" (issue 25): for a feedback run on an SFT model it
    scores only the held-out ratings' own answers, which the raters wrote and the run just trained toward, never
    the model's held-out documents (20 of `pirate_chat`'s), so raters choose both the lesson and the exam."""
    db = module_samples
    db[defaults.MODELS].insert_one(model("guarded", tiny_model_path, feedback={"method": "kto", "every": 12}))
    first = wait_for(db[defaults.MODELS], "guarded", finished, timeout_s=600)
    assert first["status"] == "succeeded", first.get("error")
    for n in range(12):
        rated(db, "guarded", f"question {n}", {"rating": 1}, output=f"zz qq zz qq {n}")
    done = wait_for(db[defaults.MODELS], "guarded", lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    gate = done["runs"][-1]["promotion"]
    own_held_out = db["pirate_chat"].count_documents({"_fold": "valid"})
    assert gate.get("documents", 0) >= own_held_out, gate


def test_class3_two_ratings_stamped_with_a_list_of_runs_start_a_feedback_run_after_every_run(db, server_uri):
    """A user expects each rating to count toward one run at most ("no daemon can lose or double it"), so that a
    writer who stops writing stops starting runs: two ratings inserted with `feedback_run: [1, 2, ...]` (the server's
    `$eq` matches an array holding the run) are counted by every run's count, and each run that ends starts the next
    one on the same two ratings, training the victim for ever on one insert."""
    runs = list(range(1, 100))
    rated(db, "victim", "forever good", {"rating": 1}, feedback_run=runs)
    rated(db, "victim", "forever bad", {"rating": -1}, feedback_run=runs)
    started = [run for run in (1, 2, 3) if due(server_uri, db, spec_of(every=2), run=run) == ["victim"]]
    assert len(started) <= 1, f"the same two ratings started a feedback run after runs {started}"


@pytest.mark.parametrize("unusable", [{"rating": bson.Decimal128("0.5")}, {"rating": -1, "better": ""}],
                         ids=["decimal_rating", "empty_better"])
def test_class4_ratings_the_server_selects_but_every_run_skips_count_toward_every(db, server_uri, unusable):
    """A user expects only ratings a run can use to count toward `every` (the README: "Only ratings a run can use are
    selected, counted toward every"): a Decimal128 rating and an empty `better` pass the server's `usable` check,
    are counted, and every run then skips them (`parse_feedback` refuses both), so 2 good ratings and 2 such start
    a run of `every: 4` now, on 2 examples."""
    rated(db, "victim", "good", {"rating": 1})
    rated(db, "victim", "bad", {"rating": -1})
    rated(db, "victim", "odd 1", unusable)
    rated(db, "victim", "odd 2", unusable)
    assert due(server_uri, db, spec_of(every=4)) == []


def test_class2_ratings_the_trainer_drops_below_a_dropped_last_batch_fail_the_model(module_samples, module_daemon,
                                                                                    tiny_model_path):
    """A user expects raters never to fail their model (the README: "A rater cannot fail a model"): with a batch of 4
    and `dataloader_drop_last`, 4 ratings start a feedback run, and 2 of them a rater wrote with prompts that fill
    `max_length` (within the input caps) are dropped by trl, so 2 rows are left, fewer than a batch: the run's step
    check fails the model `invalid_document`, naming `trainer.per_device_train_batch_size`, instead of ending
    `nothing_to_train` with what served serving on."""
    db = module_samples
    trainer = {**QUICK, "per_device_train_batch_size": 4, "dataloader_drop_last": True}
    db[defaults.MODELS].insert_one(model("dropped", tiny_model_path, trainer, feedback={"method": "kto", "every": 4}))
    first = wait_for(db[defaults.MODELS], "dropped", finished, timeout_s=600)
    assert first["status"] == "succeeded", first.get("error")
    for n, rating in enumerate([1, -1]):
        rated(db, "dropped", f"honest {n}", {"rating": rating})
        rated(db, "dropped", f"{n} " + "ahoy matey " * 200, {"rating": rating})
    done = wait_for(db[defaults.MODELS], "dropped", lambda d: d.get("run") == 2 and finished(d), timeout_s=600)
    assert done["status"] == "succeeded" and "error" not in done, done.get("error")
    assert done["runs"][-1].get("outcome") == "nothing_to_train", done["runs"][-1]
    assert done["best_checkpoint"]["run"] == 1, "what served serves on"


def test_class3_a_model_whose_run_waits_to_be_claimed_loses_its_place_in_the_feedback_count(db, server_uri):
    """A user expects a model a daemon counts feedback for to keep its place among the `MONGOTUNE_RETRAIN_MAX_MODELS`
    while one of its runs waits to be claimed (README: only failed and cancelled models hold no place; the retrainer
    keeps a pending model's): seen pending at one pass (its own feedback run started, or waits for a free slot), it
    was forgotten, and a model another writer inserted meanwhile took its place for good, so its ratings never
    counted again on that daemon."""
    victim, newcomer = spec_of(), other("other")
    life = [{"victim": (victim, state("victim"))},
            {"victim": (victim, state("victim", "pending")), "other": (newcomer, state("other"))},
            lambda: honest_ratings(db),  # written once run 2 serves
            {"victim": (victim, state("victim", run=2)), "other": (newcomer, state("other"))}]
    assert restarts(server_uri, db, life) == ["victim"]


def test_class3_one_pass_stamps_twice_its_bound_where_a_feedback_filter_passes_ratings_over(db, server_uri):
    """A user expects one model's pass to stamp at most `MONGOTUNE_MAX_FEEDBACK_ROWS` ratings (README: "at most
    MONGOTUNE_MAX_FEEDBACK_ROWS per pass"), whatever a writer floods in: with a `feedback.filter`, the ratings it
    passes over were stamped (0) on a bound of their own, so a flood of both kinds cost a pass twice the bound."""
    limits = Limits(max_feedback_rows=5)
    db[defaults.REQUESTS].insert_many([
        {"model": "flood", "input": f"q {n}", "status": "done", "output": "a", "feedback": {"rating": 1},
         **({"tag": "keep"} if n % 2 else {})} for n in range(40)])
    spec = parse_model({**BASE, "_id": "flood", "feedback": {"method": "kto", "every": 5, "filter": {"tag": "keep"}}},
                       limits)
    due(server_uri, db, spec, limits=limits)
    stamped = db[defaults.REQUESTS].count_documents({"model": "flood", "feedback_run": {"$exists": True}})
    assert stamped <= limits.max_feedback_rows, stamped


def test_class3_ratings_no_run_can_use_are_stamped_once_not_read_again_at_every_pass(db, server_uri):
    """A user expects each pass to look at the ratings written since the last one (README: "a flood is stamped over
    several passes"; a filter's passed-over ratings are stamped 0 so that each pass looks at new ratings only). A
    request rated in a shape no run uses (an `output` that is not text, an unknown field in `feedback`), or that ended
    other than `done`, was never stamped, so every pass read it again: on MongoDB the feedback index holds such ratings
    in the very range the stamp query reads (this model, no stamp, a rating in [-1, 1]), ahead of the newer honest
    ones, and a writer's flood of them on another user's model made that query run into its 10 s limit (QUERY_MS) at
    every pass, so the model's honest ratings never counted. Now they are stamped `PASSED_OVER` once; a request not
    ended yet is left for a pass after it ends, and the honest ratings still count."""
    shapes = [{"output": 7, "feedback": {"rating": 1}}, {"output": "a", "feedback": {"rating": 1, "x": 1}},
              {"status": "failed", "output": "a", "feedback": {"rating": -1}},
              {"status": "cancelled", "feedback": {"rating": 1}}]
    db[defaults.REQUESTS].insert_many([{"model": "victim", "input": f"q {n}", "status": "done",
                                        "completed_at": defaults.now(), **shapes[n % len(shapes)]} for n in range(20)])
    waiting = db[defaults.REQUESTS].insert_one({"model": "victim", "input": "q", "status": "running",
                                                "feedback": {"rating": 1}}).inserted_id
    honest_ratings(db)
    assert due(server_uri, db, spec_of(every=2)) == ["victim"]
    read_again = [d["_id"] for d in db[defaults.REQUESTS].find(
        {"model": "victim", "feedback_run": {"$exists": False}, "feedback.rating": {"$gte": -1, "$lte": 1}})]
    assert read_again == [waiting], f"{len(read_again)} ratings in the stamp query's index range at the next pass"
    stamps = Counter(d.get("feedback_run") for d in db[defaults.REQUESTS].find({"model": "victim"}))
    assert stamps == {feedback.PASSED_OVER: 20, 1: 2, None: 1}, stamps


HUGE_CHAT_LIMITS = Limits(max_input_chars=10_000, max_messages=100)
MOST_HELD = 100_000_000  # a few of the server's replies (16 MB each, raw and decoded), not the 150 MB read


def huge_chats_ahead_of_honest_ratings(db, count: int) -> None:
    """Two honest ratings of "victim", and `count` newer ones of chats the server's check passes (each message within
    `max_input_chars`, at most `max_messages` of them) but whose sum no run keeps: 1 MB each under HUGE_CHAT_LIMITS."""
    start = defaults.now()
    for n, rating in enumerate([1, -1]):
        rated(db, "victim", f"honest {n}", {"rating": rating}, completed_at=start)
    chat = [{"role": "user", "content": "x" * HUGE_CHAT_LIMITS.max_input_chars}] * HUGE_CHAT_LIMITS.max_messages
    for first in range(0, count, 10):
        db[defaults.REQUESTS].insert_many([
            {"model": "victim", "input": chat, "status": "done", "output": "a", "feedback": {"rating": 1},
             "completed_at": start + dt.timedelta(seconds=1 + n)} for n in range(first, min(first + 10, count))])


def peak_bytes(call):
    """What `call` returns, and the most memory Python held at once while it ran (this process)."""
    import tracemalloc
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_class3_a_due_check_holds_whole_batches_of_ratings_too_long_to_keep(db, server_uri):
    """A user expects the daemon that serves everyone to hold at most what the operator's caps allow of the ratings it
    reads (`_enough`: "What is kept is bounded by the operator's caps ... whatever anyone inserted"): the server's
    check bounds each message of a chat, not their sum, so a rated chat of `max_messages` messages of
    `max_input_chars` each passes it (200 x 32,000 characters by default, 6.4 MB), and the check held a whole batch of
    them (100, then 200, 400, 800, 1,600) before dropping them: 1,600 such ratings of one writer are 10 GB in the
    daemon at once. Here 150 of 1 MB, newer than two honest ratings: a few replies' worth (16 MB each) at most."""
    huge_chats_ahead_of_honest_ratings(db, 150)
    found, peak = peak_bytes(lambda: due(server_uri, db, spec_of(every=2), limits=HUGE_CHAT_LIMITS))
    assert found == ["victim"]
    assert peak < MOST_HELD, f"{peak / 1e6:.0f} MB held"


def test_class3_a_feedback_run_holds_every_rating_too_long_to_keep_until_it_has_read_them_all(db):
    """A user expects a feedback run to hold at most what the operator's caps allow of what it reads, as a job reading
    training documents does: the run read every selected rating into one list (up to MONGOTUNE_MAX_FEEDBACK_ROWS,
    2,000 chats of 6.4 MB by default: 13 GB, an out-of-memory failure of the model a rater wrote) and dropped those
    too long only then. Here 150 of 1 MB, newer than two honest ratings: its entry counts them as skipped."""
    huge_chats_ahead_of_honest_ratings(db, 150)
    entry, peak = peak_bytes(lambda: run_entry(db, spec_of(every=2), HUGE_CHAT_LIMITS))
    assert entry["count"] == 152 and entry["skipped"]["count"] == 150 and entry["examples"] == 2, entry
    assert peak < MOST_HELD, f"{peak / 1e6:.0f} MB held"


@pytest.mark.parametrize("typed", ["4_2", " 42", "\uff14\uff12"])
def test_class1_listener_feedback_rates_request_42_for_text_that_is_no_integer_as_written(db, server_uri, typed):
    """A user expects REQUEST_ID to name the request whose `_id` reads as they typed it (README: "an ObjectId's hex, an
    integer or the text: the one request that matches"): text that is no integer as written ("4_2", " 42", fullwidth
    digits) was read by Python's int() as 42, so where no request has that text (deleted, expired, mistyped) another
    writer's request 42 of the same model was rated, endorsing its answer, and the line said the typed id was."""
    rated(db, "victim", "planted question", None, _id=42, output="the answer the planter wants endorsed")
    result = CliRunner().invoke(cli, ["feedback", "--uri", server_uri, "--db", db.name, "victim", typed, "--good"])
    assert db[defaults.REQUESTS].find_one({"_id": 42}).get("feedback") is None, result.output
    assert result.exit_code != 0 and "no request with _id" in result.output, result.output


def test_class3_after_a_restart_the_models_counted_before_keep_their_places_in_the_feedback_count(db, server_uri):
    """A user expects a model a daemon counted feedback for to keep its place among the `MONGOTUNE_RETRAIN_MAX_MODELS`
    when that daemon restarts (turns.py: "a newcomer never takes the place of a model followed before it, whatever its
    id"), as a model counting new documents does. Kept in memory only, the order was lost at a restart: every model
    was then first seen in one pass, ordered by id, so another writer's models whose ids sort first (here "a") took
    the places, restart after restart."""
    victim, newcomer = spec_of(), other("a")
    both = {"victim": (victim, state("victim")), "a": (newcomer, state("a"))}
    assert restarts(server_uri, db, [{"victim": (victim, state("victim"))}, both, lambda: honest_ratings(db)],
                    [both]) == ["victim"]


def test_a_restart_while_a_counted_model_waits_to_be_claimed_keeps_its_place(db, server_uri):
    """The stored order reaches the last model counted, so a pending model before it (its feedback run waits for a
    slot when the daemon stops) is counted again first once it serves, not a newcomer whose id sorts first."""
    victim, newcomer = spec_of(), other("a")
    first = [{"victim": (victim, state("victim"))},
             {"victim": (victim, state("victim", "pending")), "a": (newcomer, state("a"))},
             lambda: honest_ratings(db)]  # written once run 2 serves
    assert restarts(server_uri, db, first, [{"victim": (victim, state("victim", run=2)),
                                             "a": (newcomer, state("a"))}]) == ["victim"]


@pytest.mark.parametrize("keys", ["victim", [7, {"$gt": ""}, None], ["a" * 200] * 5])
def test_a_stored_feedback_order_a_person_spoiled_orders_nothing_and_stops_nothing(db, server_uri, keys):
    """The order is the listener's own record, but one edited by hand (keys of another type, unknown models) is an
    order of none, or of the models it names that exist: the pass counts as on a first start."""
    db[defaults.LISTENER].insert_one({"_id": "feedback:d", "kind": "feedback_order", "keys": keys})
    honest_ratings(db)
    assert due(server_uri, db, spec_of()) == ["victim"]
    assert db[defaults.LISTENER].find_one({"_id": "feedback:d"})["keys"] == [digest("victim")]


def test_class2_a_writers_long_model_ids_make_the_stored_feedback_order_too_large_and_stop_every_pass(db, server_uri):
    """A user expects one writer's models never to stop the feedback count of the others (README: a writer's models
    cost others at most their places). The stored order held up to twice `MONGOTUNE_RETRAIN_MAX_MODELS` keys, each
    the canonical JSON of a model id: a 512-character id of emoji is 6 KB of `\\ud83d\\ude00` escapes, so with the
    operator's bound at 1,500 (it may be 10,000) a writer's 2,999 models waiting for their first run, seen before
    another user's, made the record 18 MB: the driver refused the write (DocumentTooLarge, no OperationFailure),
    which ended the whole pass, for every model, at every retrain check."""
    honest_ratings(db)
    waiting = parse(ModelState, {"_id": "w", "status": "pending", "run": 0})
    victim = spec_of()
    models = {ids.key(f"{n:04d}" + "\U0001F600" * 508): (victim, waiting) for n in range(2999)}
    models[ids.key("victim")] = (victim, parse(ModelState, {"_id": "victim", "status": "succeeded", "run": 1}))

    async def one_pass():
        client = AsyncMongoClient(server_uri, tz_aware=True)
        try:
            trigger = FeedbackTrigger(client[db.name], Limits(), 1500, SkipLog(), "d")
            return [s.id for s in await trigger.due(models)]
        finally:
            await client.close()
    assert asyncio.run(one_pass()) == ["victim"]
    stored = db[defaults.LISTENER].find_one({"_id": "feedback:d"})
    assert stored is not None and digest(ids.key("victim")) in stored["keys"], "not stored: a restart loses the order"


def test_class3_a_writers_models_waiting_for_a_first_run_push_a_counted_model_out_of_the_stored_order(db, server_uri):
    """A user expects a model a daemon counted feedback for to keep its place when that daemon restarts (README: "an
    order it keeps in `_listener` so that a restart keeps it too"). The order was stored up to the last model counted
    but cut at twice `MONGOTUNE_RETRAIN_MAX_MODELS` keys from its start, so a writer's models seen first and still
    pending (waiting for a first run that never comes) filled it: the counted model was not stored, and after a
    restart the writer's model whose id sorts first ("a") took its place."""
    victim, newcomer = spec_of(), other("a")
    waiting = {f"p{n}": (newcomer, state(f"p{n}", "pending", 0)) for n in range(3)}
    both = {**waiting, "victim": (victim, state("victim")), "a": (newcomer, state("a"))}
    first = [waiting, {**waiting, "victim": (victim, state("victim"))}, both, lambda: honest_ratings(db)]
    assert restarts(server_uri, db, first, [both]) == ["victim"]


def test_class2_one_rating_whose_id_the_server_cannot_return_stops_every_passed_over_stamp_of_its_model(db, server_uri):
    """A user expects the ratings no run reads to be stamped once, so that a writer's flood of them no longer lies in
    the range every pass reads (README: "stamped passed over once"). The passed-over query selects requests of any
    `_id`, and the stamp reads each `_id` back to write by it: one rated request of the model, ended, whose `_id` the
    server cannot return (nested 950 levels: the embedded server stores it, and fails any reply that carries it) made
    that read fail at every pass, so no other passed-over rating of the model was ever stamped again."""
    insert_nested(db[defaults.REQUESTS], {"_id": nested_document(950), "model": "victim", "input": "q",
                                          "status": "failed", "feedback": {"rating": 1}})
    db[defaults.REQUESTS].insert_many([{"model": "victim", "input": f"q {n}", "status": "done", "output": 7,
                                        "completed_at": defaults.now(), "feedback": {"rating": 1}} for n in range(20)])
    honest_ratings(db)
    assert due(server_uri, db, spec_of(every=2)) == ["victim"]
    stamps = Counter(d.get("feedback_run") for d in db[defaults.REQUESTS].find({"model": "victim", "output": {
        "$exists": True}}))
    assert stamps == {feedback.PASSED_OVER: 20, 1: 2}, stamps


def document_id_flood(db) -> None:
    """20 done requests of "victim" rated in a shape no run reads, each with a document as its `_id`."""
    db[defaults.REQUESTS].insert_many([{"_id": {"n": n}, "model": "victim", "input": f"q {n}", "status": "done",
                                        "output": "a", "completed_at": defaults.now(), "feedback": {"rating": 1}}
                                       for n in range(20)])


def test_class3_a_flood_of_ratings_with_document_ids_stays_in_the_range_every_pass_reads(db, server_uri):
    """A user expects a writer's flood of ratings no run reads to be stamped once, so that it no longer lies in the
    range of the feedback index every pass reads (this model, no stamp, a rating), whatever their `_id`: left out of
    the stamp so that one the server cannot return stops nothing, ratings whose `_id` is a document were never
    stamped, and a flood of them cost every pass of the model a read of each."""
    document_id_flood(db)
    honest_ratings(db)
    assert due(server_uri, db, spec_of(every=2)) == ["victim"]
    read_again = db[defaults.REQUESTS].count_documents(
        {"model": "victim", "feedback_run": {"$exists": False}, "feedback.rating": {"$gte": -1, "$lte": 1}})
    assert read_again == 0, f"{read_again} ratings in the stamp query's index range at the next pass"


@pytest.mark.xfail(strict=True, reason="each passed-over rating is stamped by its _id read back, and the server fails "
                   "every read that returns the deep one; stamping without reading _ids (a bounded update by a "
                   "field the daemon writes) or a feedback index that leaves document ids out would be needed")
def test_class3_one_rating_the_server_cannot_return_keeps_a_flood_with_document_ids_in_the_range(db, server_uri):
    """A user expects a writer's flood of ratings no run reads to be stamped once, whatever their `_id`. One rating
    with an `_id` nested 950 levels (the embedded server stores it, and fails any reply that carries it) fails the
    read of those with document ids at every pass, so a flood of them stays in the range every pass reads."""
    insert_nested(db[defaults.REQUESTS], {"_id": nested_document(950), "model": "victim", "input": "q",
                                          "status": "failed", "feedback": {"rating": 1}})
    document_id_flood(db)
    honest_ratings(db)
    assert due(server_uri, db, spec_of(every=2)) == ["victim"]
    left = db[defaults.REQUESTS].count_documents({"model": "victim", "feedback_run": {"$exists": False},
                                                  "output": "a", "_id": {"$type": "object"}})
    assert left == 0, f"{left} ratings in the stamp query's index range at the next pass"


def test_class3_a_writers_waiting_models_push_a_counted_model_whose_run_waits_out_of_the_stored_order(db, server_uri):
    """A user expects a model whose feedback run waits to be claimed to keep its place when the daemon restarts
    meanwhile (README: "one whose run waits to be claimed keeps its place"). The stored order kept at most
    `MONGOTUNE_RETRAIN_MAX_MODELS` waiting models, the first ones: a writer's model waiting for a first run that never
    comes, seen first, took that slot, so the counted model was not stored, and after the restart the writer's model
    seen after it ("a") kept the place."""
    victim, newcomer = spec_of(), other("a")
    waiting = {"p": (newcomer, state("p", "pending", 0))}
    first = [waiting, {**waiting, "victim": (victim, state("victim"))},
             {**waiting, "victim": (victim, state("victim", "pending")), "a": (newcomer, state("a"))},
             lambda: honest_ratings(db)]  # written once run 2 serves
    after = {**waiting, "victim": (victim, state("victim", run=2)), "a": (newcomer, state("a"))}
    assert restarts(server_uri, db, first, [after]) == ["victim"]


def test_a_writers_waiting_model_stored_once_never_outranks_a_counted_one_after_another_restart(db, server_uri):
    """The record says which stored models were counted: a writer's model waiting for a first run, stored while
    there was room, is no model counted before after a restart, so at a second restart a counted model whose run
    waits still keeps its place ahead of it."""
    victim, newcomer = spec_of(), other("a")
    waiting = {"p": (newcomer, state("p", "pending", 0))}
    first = [waiting, {**waiting, "victim": (victim, state("victim"))}]
    second = [{**waiting, "victim": (victim, state("victim"))},
              {**waiting, "victim": (victim, state("victim", "pending")), "a": (newcomer, state("a"))},
              lambda: honest_ratings(db)]  # written once run 2 serves
    after = {**waiting, "victim": (victim, state("victim", run=2)), "a": (newcomer, state("a"))}
    assert restarts(server_uri, db, first, second, [after]) == ["victim"]


@pytest.mark.parametrize("make_id", [lambda n: Binary(bytes([n]) * 8), lambda n: Binary(bytes([n]) * 16, 4),
                                     lambda n: Code(f"x{n}")], ids=["binary", "uuid", "code"])
def test_class3_ratings_with_an_id_of_another_scalar_type_are_passed_over_too(db, server_uri, make_id):
    """A user expects a writer's flood of ratings no run reads to be stamped once, whatever the BSON type of their
    `_id` (a binary, a UUID and JavaScript code are all `_id`s MongoDB takes): an `_id` type the passed-over stamp
    did not list was never stamped, so such a flood stayed in the range every pass reads."""
    db[defaults.REQUESTS].insert_many([{"_id": make_id(n), "model": "victim", "input": f"q {n}", "status": "done",
                                        "output": "a", "completed_at": defaults.now(), "feedback": {"rating": 1}}
                                       for n in range(20)])
    honest_ratings(db)
    assert due(server_uri, db, spec_of(every=2)) == ["victim"]
    left = db[defaults.REQUESTS].count_documents({"model": "victim", "feedback_run": {"$exists": False}})
    assert left == 0, f"{left} ratings in the stamp query's index range at the next pass"
