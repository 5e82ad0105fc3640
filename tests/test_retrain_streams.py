"""Users' change streams and the daemon's own bookkeeping (issue 21, class 3: capacity apportioned).

A writer of model documents decides how many models follow new documents; the daemon decides how many
streams that costs (one per followed collection, within the operator's bound) and keeps its heartbeat,
claims and leases on a client of their own, so no number of users' streams makes a live daemon look dead.
"""

import asyncio
import contextlib
import datetime as dt
import logging
import threading

import bson
import pytest
from pymongo.read_concern import ReadConcern

from listener import retrain
from tests.conftest import DaemonProcess, wait_for
from tests.documents import insert_nested, nested_document
from tests.test_retrain import notes, retraining, solo, until
from training import defaults, ids, schedule
from training.config import SpecError


def assert_heartbeat_never_lapses(db, daemon, record_id, seconds: float = 30) -> None:
    """For `seconds` (several retrain passes), the live daemon's heartbeat never runs out: otherwise the other
    daemons take it for dead and take its requests over."""
    lapsed = []
    deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    while dt.datetime.now(dt.timezone.utc) < deadline and daemon.process.poll() is None:
        beat = db[defaults.LISTENER].find_one({"_id": record_id})
        now = dt.datetime.now(dt.timezone.utc)
        if beat["alive_until"].replace(tzinfo=dt.timezone.utc) < now:
            lapsed.append(now - beat["alive_until"].replace(tzinfo=dt.timezone.utc))
        threading.Event().wait(0.5)
    assert daemon.process.poll() is None, daemon.log()[-3000:]
    assert lapsed == [], (f"a live daemon's heartbeat lapsed {len(lapsed)} times (by up to {max(lapsed)}): "
                          "the others take it for dead")


def test_class3_users_change_streams_never_make_a_live_daemon_look_dead(db, server_uri, tmp_path, model_root,
                                                                     tiny_model_path):
    """48 models with `retrain.on_new_documents` that never retrain (failed), on a daemon whose operator gave
    it a pool of 4 connections: the heartbeat's `alive_until` is never seen past, or the other daemons would
    take the live daemon for dead and take its requests over."""
    db[defaults.MODELS].insert_many([{"_id": f"idle{n}", "model_name_or_path": tiny_model_path, "status": "failed",
                                      "data": {"collection": "feed"}, "retrain": {"on_new_documents": 1}}
                                     for n in range(48)])
    uri = server_uri + ("&" if "?" in server_uri else "?") + "maxPoolSize=4"
    daemon = DaemonProcess(uri, db.name, tmp_path, "pooled", model_root=model_root)
    try:
        record = wait_for(db[defaults.LISTENER], {"$regex": "^daemon:pooled:"}, lambda d: True, timeout_s=60)
        assert_heartbeat_never_lapses(db, daemon, record["_id"])
    finally:
        daemon.stop()


def counts(db) -> dict:
    """The solo daemon's counts by model, over all its tallies (one per collection)."""
    return {c["model"]: c["count"] for record in db[defaults.LISTENER].find({"kind": retrain.TALLY, "daemon": "solo"})
            for c in record["counts"]}


def test_models_on_one_collection_share_one_stream_each_counting_what_matches_its_own_filter(db, server_uri,
                                                                                              tmp_path):
    """One stream for a collection, whatever the number of models and filters that follow it; a failed model is
    not followed (it never retrains by itself); a collection beyond the operator's bound is not followed."""
    english = lambda doc_id, n: {**retraining(doc_id, "/models/never-loaded", on_new_documents=n),  # noqa: E731
                                 "status": "succeeded", "run": 1}
    db[defaults.MODELS].insert_many([
        english("en3", 3), english("en9", 9), {**english("gave-up", 1), "status": "failed"},
        {**english("fr2", 2), "data": {"collection": "notes", "key": "text", "filter": {"lang": "fr"}}},
        {**english("all5", 5), "data": {"collection": "notes", "key": "text"}},
        {**english("elsewhere", 1), "data": {"collection": "letters", "key": "text"}},
    ])

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path, environ={"MONGOTUNE_RETRAIN_MAX_COLLECTIONS": "1"}) as retrainer:
            await retrainer.check()
            assert list(retrainer.watchers) == ["notes"]  # "letters" is the second collection: over the bound
            await until(lambda: counts(db))
            db.letters.insert_one({"text": "not counted"})
            db.notes.insert_many(notes("en", 3) + notes("fr", 2))
            await until(lambda: db[defaults.MODELS].count_documents({"status": "pending"}) == 3)
            assert counts(db) == {"all5": 5, "en3": 3, "en9": 3, "fr2": 2}

    asyncio.run(scenario())
    status = {d["_id"]: (d["status"], d.get("trigger")) for d in db[defaults.MODELS].find()}
    assert status == {"en3": ("pending", "new_documents"), "fr2": ("pending", "new_documents"),
                      "all5": ("pending", "new_documents"), "en9": ("succeeded", None),
                      "gave-up": ("failed", None), "elsewhere": ("succeeded", None)}




def test_class3_a_stream_the_server_never_opens_is_tried_again_after_a_growing_wait(db, server_uri, tmp_path, caplog):
    """A collection the server refuses to watch at all (on MongoDB a view, a time-series collection, a user without
    the changeStream privilege: code 166 and its kin; the embedded server watches those, so here the retrainer asks
    for streams with a read concern it refuses them, code 72). The watcher must wait longer after each refusal:
    trying again at once opened thousands of streams, logged and wrote a tally a thousand times a second."""
    caplog.set_level(logging.WARNING, logger="listener.retrain")
    db[defaults.MODELS].insert_one({**retraining("en3", "/models/never-loaded", on_new_documents=3),
                                    "status": "succeeded", "run": 1})

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            retrainer.db = retrainer.db.with_options(read_concern=ReadConcern("local"))
            await retrainer.check()
            await asyncio.sleep(3)  # the span over which attempts are counted, not a wait for something to happen
            assert not retrainer.watchers["notes"][1].done()

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.name == "listener.retrain"]
    assert 1 <= len(warnings) <= 5, f"{len(warnings)} warnings in 3 s: {warnings[:3]}"
    assert not [w for w in warnings if "data.filters" in w], f"the filters were blamed and dropped: {warnings}"


def test_class3_one_odd_insert_never_loses_the_inserts_after_it(db, server_uri, tmp_path):
    """A model retrains after 3 new English notes. Someone inserts one document whose `_id` the server cannot put
    in a change event: the stream fails and cannot resume past that event. The odd insert must be passed over,
    the others counted (counting "from now on" would lose them, and one such insert now and then would keep the
    model from ever retraining)."""
    db[defaults.MODELS].insert_one({**retraining("en3", "/models/never-loaded", on_new_documents=3),
                                    "status": "succeeded", "run": 1})

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            await until(lambda: counts(db) == {"en3": 0})
            insert_nested(db.notes, {"_id": nested_document(975), "text": "odd", "lang": "en"})
            db.notes.insert_many(notes("en", 3))
            await until(lambda: db[defaults.MODELS].find_one({"_id": "en3"})["status"] == "pending", retrainer)

    asyncio.run(scenario())


@pytest.mark.parametrize("bad", [{"$regex": "("}, {"$type": "no-such-alias"}, {"$mod": [0, 0]}],
                         ids=["regex", "type", "mod"])
def test_class2_one_models_filter_never_stops_counting_for_the_others_on_its_collection(db, server_uri, tmp_path,
                                                                                         bad):
    """A edits the `data.filter` of A's succeeded model on the collection B's model follows to one the embedded
    server accepts when a stream opens but fails on each event. A's filter must cost only A's model its count:
    B's model retrains after its 3 notes, and A's model is not followed, its `warnings` saying why."""
    db[defaults.MODELS].insert_many([
        {**retraining("b", "/models/never-loaded", on_new_documents=3), "status": "succeeded", "run": 1},
        {**retraining("a", "/models/never-loaded", on_new_documents=3), "status": "succeeded", "run": 1,
         "data": {"collection": "notes", "key": "text", "filter": {"x": bad}}}])

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            await until(lambda: counts(db) == {"b": 0})
            db.notes.insert_many(notes("en", 3))
            try:
                await until(lambda: db[defaults.MODELS].find_one({"_id": "b"})["status"] == "pending", retrainer)
            except TimeoutError:
                pytest.fail(f"B's model never counted its 3 notes: {counts(db)}")

    asyncio.run(scenario())
    a_model = db[defaults.MODELS].find_one({"_id": "a"})
    assert a_model["status"] == "succeeded" and "data.filter" in str(a_model.get("warnings")), a_model


def test_class2_a_filter_the_server_fails_on_only_while_counting_costs_only_its_model(db, server_uri, tmp_path):
    """The filter check passes (on MongoDB a filter can pass it and fail on the documents inserted later; here the
    check is taken as passed): the shared stream fails at each insert, is opened without the filters, each
    insert is checked per filter, and the one that fails stops counting for its own model at the next pass."""
    bad = {"x": {"$regex": "("}}
    db[defaults.MODELS].insert_many([
        {**retraining("b", "/models/never-loaded", on_new_documents=3), "status": "succeeded", "run": 1},
        {**retraining("a", "/models/never-loaded", on_new_documents=3), "status": "succeeded", "run": 1,
         "data": {"collection": "notes", "key": "text", "filter": bad}}])

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            retrainer.filter_checks[retrain.filter_check("notes", bad)] = None
            await retrainer.check()
            await until(lambda: counts(db) == {"a": 0, "b": 0})
            db.notes.insert_many(notes("en", 3))
            await until(lambda: db[defaults.MODELS].find_one({"_id": "b"})["status"] == "pending", retrainer)
            await until(lambda: "data.filter" in str(db[defaults.MODELS].find_one({"_id": "a"}).get("warnings")),
                       retrainer)
            await retrainer.check()
            assert [spec.id for members in retrainer.following.values() for spec, _ in members.values()] == ["b"]

    asyncio.run(scenario())


def test_class2_a_forged_tally_never_stops_the_retrain_pass(db, server_uri, tmp_path):
    """Someone writes a record into `_listener` shaped like the daemon's tally of another collection, its counts
    holding a key that is not a string: the daemon's first pass reads which models its tallies counted. It must
    skip the record and count for the model, whose run starts after its 3 new notes."""
    db[defaults.MODELS].insert_one({**retraining("en3", "/models/never-loaded", on_new_documents=3),
                                    "status": "succeeded", "run": 1})
    db[defaults.LISTENER].insert_one({"_id": "retrain:solo:forged", "kind": retrain.TALLY, "daemon": "solo",
                                      "collection": "forged", "counts": [{"key": ["x"]}]})

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            await until(lambda: counts(db) == {"en3": 0})
            db.notes.insert_many(notes("en", 3))
            await until(lambda: db[defaults.MODELS].find_one({"_id": "en3"})["status"] == "pending", retrainer)

    asyncio.run(scenario())


def test_class1_a_view_is_never_followed_for_new_documents(db, server_uri, tmp_path):
    """A names a view as `data.collection` of A's models (its pipeline, a `$lookup` into `_requests` say, would run
    with the daemon's rights whenever an insert is checked against a filter): neither A's model with a filter nor
    the one without is followed, each one's `warnings` saying why; B's model on `notes` is followed."""
    db.create_collection("window", viewOn="notes", pipeline=[{"$lookup": {
        "from": defaults.REQUESTS, "pipeline": [], "as": "everyone"}}])
    on_window = {"collection": "window", "key": "text"}
    db[defaults.MODELS].insert_many([
        {**retraining("b", "/models/never-loaded", on_new_documents=3), "status": "succeeded", "run": 1},
        {**retraining("a1", "/models/never-loaded", on_new_documents=3), "status": "succeeded", "run": 1,
         "data": {**on_window, "filter": {"lang": "en"}}},
        {**retraining("a2", "/models/never-loaded", on_new_documents=3), "status": "succeeded", "run": 1,
         "data": on_window}])

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            assert {c: sorted(m) for c, m in retrainer.following.items()} == {"notes": [ids.key("b")]}

    asyncio.run(scenario())
    for doc_id in ("a1", "a2"):
        warnings = str(db[defaults.MODELS].find_one({"_id": doc_id}).get("warnings"))
        assert "data.collection" in warnings and "view" in warnings, (doc_id, warnings)


def test_class3_one_writers_models_never_push_anothers_out_of_being_followed(db, server_uri, tmp_path):
    """The daemon follows at most `retrain_max_collections` collections: a writer who gives models ids that sort
    first ("!0"...) on collections of their own must not take the place of a collection already followed. Here
    the bound is 2, B's model follows `notes`, and A's two models arrive later: B's model must still retrain
    after its 3 new notes."""
    db[defaults.MODELS].insert_one({**retraining("b", "/models/never-loaded", on_new_documents=3),
                                    "status": "succeeded", "run": 1})
    a_models = [{**retraining(f"!{n}", "/models/never-loaded", on_new_documents=1), "status": "succeeded", "run": 1,
                 "data": {"collection": f"a_{n}", "key": "text"}} for n in range(2)]

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path,
                        environ={"MONGOTUNE_RETRAIN_MAX_COLLECTIONS": "2"}) as retrainer:
            await retrainer.check()
            db[defaults.MODELS].insert_many(a_models)
            await retrainer.check()
            db.notes.insert_many(notes("en", 3))
            try:
                await until(lambda: db[defaults.MODELS].find_one({"_id": "b"})["status"] == "pending", retrainer)
            except TimeoutError:
                pytest.fail(f"B's model was never counted: the daemon follows only {sorted(retrainer.watchers)}")
            assert sorted(retrainer.watchers) == ["a_0", "notes"]  # the first newcomer took the free place

    async def restarted() -> None:  # its tallies say which models it counted: they keep their places
        async with solo(server_uri, db.name, tmp_path,
                        environ={"MONGOTUNE_RETRAIN_MAX_COLLECTIONS": "2"}) as retrainer:
            await retrainer.check()
            assert sorted(retrainer.watchers) == ["a_0", "notes"]

    asyncio.run(scenario())
    asyncio.run(restarted())


def test_class3_one_writers_filters_cost_the_server_a_bounded_number_of_tries_per_pass(db, server_uri, tmp_path):
    """A writer's 20 models on one collection, each with a `data.filter` of its own: trying a filter on the server
    costs it up to FILTER_CHECK_MS. A pass tries only the filters of models about to take a place, at most
    FILTER_CHECKS_PER_PASS new ones: with room for one model one filter is tried, however many passes run; with room
    for all, 4 more a pass until all are followed (a verdict is kept while a model has its filter)."""
    db[defaults.MODELS].insert_many([{**retraining(f"m{n:02}", "/models/never-loaded", on_new_documents=1),
                                      "status": "succeeded", "run": 1,
                                      "data": {"collection": "notes", "key": "text", "filter": {"n": n}}}
                                     for n in range(20)])

    async def passes(environ: dict, number: int) -> list[tuple[int, int]]:
        """After each pass: the filters tried so far, the models followed."""
        seen = []
        async with solo(server_uri, db.name, tmp_path, environ=environ) as retrainer:
            for _ in range(number):
                await retrainer.check()
                seen.append((len(retrainer.filter_checks), sum(map(len, retrainer.following.values()))))
        return seen

    assert asyncio.run(passes({"MONGOTUNE_RETRAIN_MAX_MODELS": "1"}, 3)) == [(1, 1)] * 3
    assert asyncio.run(passes({}, 5)) == [(4 * n, 4 * n) for n in range(1, 6)]


def test_class2_models_past_the_bound_are_logged_once_however_many_there_are(db, server_uri, tmp_path, caplog):
    """Models the daemon does not count for (past `retrain_max_models`) are logged as one summary line when their
    number changes, not one line per model (with more of them than the `SkipLog` remembers, every pass would log
    them all again). Here 7 models are past the bound."""
    caplog.set_level(logging.WARNING, logger="listener.retrain")
    db[defaults.MODELS].insert_many([{**retraining(f"m{n}", "/models/never-loaded", on_new_documents=1),
                                      "status": "succeeded", "run": 1} for n in range(8)])

    def bound_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "not counting new documents" in r.getMessage()]

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path, environ={"MONGOTUNE_RETRAIN_MAX_MODELS": "1"}) as retrainer:
            await retrainer.check()
            assert len(bound_lines()) == 1 and "7 models" in bound_lines()[0], bound_lines()
            caplog.clear()
            await retrainer.check()
            assert bound_lines() == [], f"the second pass logged {len(bound_lines())} lines again"
            db[defaults.MODELS].delete_one({"_id": "m7"})
            await retrainer.check()
            assert len(bound_lines()) == 1 and "6 models" in bound_lines()[0], bound_lines()

    asyncio.run(scenario())


def test_class3_one_writers_schedules_never_make_a_live_daemon_look_dead(db, start_daemon, tiny_model_path):
    """A writer's 100 models with a rare `retrain.schedule` ("0 0 1 1 mon") and a source inside the model roots,
    so each model's parse reaches the schedule's check, the costly one: each retrain pass parses the models. The
    heartbeat's `alive_until` must never be seen past, or the other daemons take a live daemon for dead (its
    requests are requeued)."""
    daemon = start_daemon()
    record = wait_for(db[defaults.LISTENER], {"$regex": "^daemon:"}, lambda d: True, timeout_s=60)
    db[defaults.MODELS].insert_many([{**retraining(f"rare{n}", tiny_model_path, schedule="0 0 1 1 mon"),
                                      "status": "failed"} for n in range(100)])
    assert_heartbeat_never_lapses(db, daemon, record["_id"])


def test_a_refused_model_is_parsed_once_per_version_and_its_source_before_its_schedule(db, server_uri, tmp_path):
    """What keeps a pass cheap whatever the models: a refusal is kept until the document changes, and the
    schedule, the costly check, comes after the source; any schedule's check searches a bounded span."""
    db[defaults.MODELS].insert_one({**retraining("rare", "/outside/the/model/roots", schedule="0 0 30 2 *"),
                                    "status": "failed"})  # both refused: the field named is the one checked first

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            first = retrainer.specs[ids.key("rare")][1]
            assert isinstance(first, SpecError) and first.field == "model_name_or_path"
            await retrainer.check()
            assert retrainer.specs[ids.key("rare")][1] is first
            db[defaults.MODELS].update_one({"_id": "rare"}, {"$set": {"retrain.schedule": "0 0 31 2 *"}})
            await retrainer.check()
            assert retrainer.specs[ids.key("rare")][1] is not first

    asyncio.run(scenario())
    six_years = (dt.datetime(2007, 1, 1) - dt.datetime(2001, 1, 1)).total_seconds()  # its first two firings only
    assert schedule.shortest_gap_s(schedule.trigger("0 0 1 1 mon", year=schedule.CYCLE), 300) == six_years
    with pytest.raises(schedule.ScheduleError, match="never fires"):
        schedule.check("0 0 30 2 mon", 300)


def test_class2_one_model_the_server_cannot_update_never_stops_the_retrain_pass(db, server_uri, tmp_path):
    """A's model is due and just under 16 MB (a large `events` entry, a field the model's parse ignores): starting
    its retrain adds an event and the server refuses the update. The pass must skip A's model and go on to B's,
    whose run ended after its 3 new notes arrived."""
    a_model = {**retraining("a", "/models/never-loaded", on_new_documents=1), "status": "succeeded", "run": 1,
               "data": {"collection": "a_notes", "key": "text"}, "events": [{"pad": ""}]}
    a_model["events"][0]["pad"] = "x" * (16 * 2**20 - len(bson.encode(a_model)) - 20)
    db[defaults.MODELS].insert_one(a_model)
    db[defaults.MODELS].insert_one({**retraining("b", "/models/never-loaded", on_new_documents=3),
                                    "status": "running", "run": 2})
    raised = []

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            await until(lambda: counts(db) == {"a": 0, "b": 0})
            db.a_notes.insert_one({"text": "A's one new document"})
            db.notes.insert_many(notes("en", 3))
            await until(lambda: counts(db) == {"a": 1, "b": 3})
            db[defaults.MODELS].update_one({"_id": "b"}, {"$set": {"status": "succeeded"}})  # B's run 2 ended
            for _ in range(3):
                try:
                    await retrainer.check()
                except Exception as exc:  # noqa: BLE001 (the daemon's Periodic would log it, every pass)
                    raised.append(f"{type(exc).__name__}: {str(exc)[:80]}")
                await asyncio.sleep(0.5)

    asyncio.run(scenario())
    b_status = db[defaults.MODELS].find_one({"_id": "b"})["status"]
    assert (b_status, raised) == ("pending", []), f"B is {b_status}; the pass raised {raised}"


def test_class3_a_writer_who_keeps_changing_filters_never_keeps_anothers_model_from_being_tried(db, server_uri,
                                                                                                   tmp_path):
    """Another user's model is counted within a few passes, however often one writer edits its own filters."""
    # 5 writer models seen first, their filters edited between passes: each pass's FILTER_CHECKS_PER_PASS tries go to
    # 4 of them, the 5th waits untried, and every model after it waits too (without the edits it is counted at once)
    writer = [{**retraining(f"w{n}", "/models/never-loaded", on_new_documents=1), "status": "succeeded", "run": 1,
               "data": {"collection": "notes", "key": "text", "filter": {"n": n, "edit": 0}}} for n in range(5)]
    db[defaults.MODELS].insert_many(writer)

    async def scenario() -> set:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            db[defaults.MODELS].insert_one({**retraining("victim", "/models/never-loaded", on_new_documents=1),
                                            "status": "succeeded", "run": 1})
            for edit in range(1, 9):  # the writer edits its own models' filters between the daemon's passes
                db[defaults.MODELS].update_many({"_id": {"$regex": "^w"}}, {"$set": {"data.filter.edit": edit}})
                await retrainer.check()
            return {key for members in retrainer.following.values() for key in members}

    assert ids.key("victim") in asyncio.run(scenario()), "the other user's model was never tried, let alone counted"


def test_class3_a_writer_who_keeps_changing_filters_never_makes_a_counted_model_lose_its_count(db, server_uri,
                                                                                              tmp_path):
    """A model already counting new documents keeps its count and retrains, whatever one writer does to its own."""
    # the writer's 5 models and the victim's are all followed; then the writer edits its filters before each pass:
    # its 5th waits for a try, so the victim (after it) waits too, leaves its collection's members, and its count
    # is dropped from the tally at each pass
    writer = [{**retraining(f"w{n}", "/models/never-loaded", on_new_documents=1000), "status": "succeeded",
               "run": 1, "data": {"collection": "notes", "key": "text", "filter": {"n": n, "edit": 0}}}
              for n in range(5)]
    db[defaults.MODELS].insert_many(writer)
    victim = {**retraining("victim", "/models/never-loaded", on_new_documents=3), "status": "succeeded", "run": 1,
              "data": {"collection": "letters", "key": "text", "filter": {"lang": "en"}}}
    letters_tally = lambda: db[defaults.LISTENER].find_one({"kind": retrain.TALLY, "collection": "letters"})  # noqa: E731
    status = lambda doc_id: db[defaults.MODELS].find_one({"_id": doc_id})["status"]  # noqa: E731

    async def scenario() -> str:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            db[defaults.MODELS].insert_one(victim)  # seen after the writer's
            for _ in range(3):
                await retrainer.check()
            assert ids.key("victim") in retrainer.following.get("letters", {}), retrainer.following
            for edit in range(1, 9):
                db[defaults.MODELS].update_many({"_id": {"$regex": "^w"}}, {"$set": {"data.filter.edit": edit}})
                before = letters_tally()
                db.letters.insert_one({"text": f"letter {edit}", "lang": "en"})
                with contextlib.suppress(TimeoutError):  # the stream counts it (a model no longer followed: never)
                    await until(lambda: letters_tally() != before or status("victim") == "pending", timeout_s=3)
                await retrainer.check()
            return db[defaults.MODELS].find_one({"_id": "victim"})["status"]

    assert asyncio.run(scenario()) == "pending", "8 new letters arrived, and the victim's model never retrained"


def test_class2_one_inserted_document_never_stops_counting_for_the_models_on_its_collection(db, server_uri,
                                                                                           tmp_path):
    """Models on a shared collection keep counting and retrain, whatever `_id` one writer's inserted document has."""
    # with two filters the stream's inserts are checked by `_id` (`_matches`); an `_id` nested 400 deep reaches the
    # retrainer in a change event but fails that query, which is taken as the server refusing each model's filter
    models = [{**retraining(name, "/models/never-loaded", on_new_documents=2), "status": "succeeded", "run": 1,
               "data": {"collection": "notes", "key": "text", "filter": {"lang": lang}}}
              for name, lang in (("victim", "en"), ("other", "fr"))]
    db[defaults.MODELS].insert_many(models)

    async def scenario() -> str:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            await until(lambda: counts(db))
            insert_nested(db.notes, {"_id": nested_document(400), "text": "odd", "lang": "en"})
            await asyncio.sleep(1)  # the stream delivers it
            await retrainer.check()
            db.notes.insert_many(notes("en", 3))
            await until(lambda: db[defaults.MODELS].find_one({"_id": "victim"})["status"] == "pending", retrainer)
            return db[defaults.MODELS].find_one({"_id": "victim"})["status"]

    try:
        asyncio.run(scenario())
    except TimeoutError:
        victim = db[defaults.MODELS].find_one({"_id": "victim"})
        pytest.fail(f"the victim never retrained after 3 new notes; its warnings: {victim.get('warnings')}")


def test_class3_a_look_alike_filter_never_changes_what_anothers_model_counts(db, server_uri, tmp_path):
    """A model counts the inserts its own filter matches, whatever filter another writer's model has."""
    # filters were keyed by json_util's text: the victim's `{at: {$gte: <date>}}` and a writer's literal
    # `{at: {$gte: {"$date": "..."}}}` (an object, which no date matches) read the same, so one stream entry
    # stands for both: the writer's stream, opened first, is kept when the victim's model joins (same text)
    since = dt.datetime(2026, 1, 1)
    victim = {**retraining("victim", "/models/never-loaded", on_new_documents=2), "status": "succeeded", "run": 1,
              "data": {"collection": "notes", "key": "text", "filter": {"at": {"$gte": since}}}}
    look_alike = {"at": {"$gte": {"$date": "2026-01-01T00:00:00Z"}}}
    writer = {**victim, "_id": "writer", "data": {"collection": "notes", "key": "text", "filter": look_alike}}
    db[defaults.MODELS].insert_one(writer)

    async def scenario() -> None:
        async with solo(server_uri, db.name, tmp_path) as retrainer:
            await retrainer.check()
            db[defaults.MODELS].insert_one(victim)
            await retrainer.check()
            await until(lambda: counts(db).keys() >= {"victim", "writer"}, retrainer)
            db.notes.insert_many([{"text": f"new {n}", "at": since + dt.timedelta(days=n)} for n in range(3)])
            await until(lambda: db[defaults.MODELS].find_one({"_id": "victim"})["status"] == "pending", retrainer)

    try:
        asyncio.run(scenario())
    except TimeoutError:
        pytest.fail(f"3 notes matching the victim's filter arrived and it never retrained: counts {counts(db)}")
