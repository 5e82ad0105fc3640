"""A writer of `_requests` documents against the batch intake (`listener.intake`): nothing one writes may stop,
wedge or starve the claims of everyone else's requests.

Fast tier: the intake and the real `Serving` queues in this process against the real server, as in
test_intake.py; no worker is started.
"""

import asyncio
import datetime as dt

import bson
import pytest
from bson import ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo.errors import OperationFailure

from listener.follow import finished, wait_for
from listener.forks import Forks
from listener.intake import Intake
from listener.leases import reap, take_over
from listener.records import RequestState, SkipLog
from listener.serving import Serving
from listener.settings import Settings
from listener.status import REQUEST_TRANSITIONS, Status
from tests.documents import insert_nested, model, nested, nested_document, request
from tests.test_claims import PATH, one_scan
from tests.test_intake import intake_for, run_with
from training import defaults, ids
from training.config import MAX_DEPTH

GOOD = "good"


async def run_until(intake, held_key: str, seconds: float) -> tuple[bool, BaseException | None]:
    """Run the intake's loop as the daemon does (woken once, as by the good request's insert event) until
    `held_key` is handed to serving or `seconds` pass; whether it was, and how the loop ended if it did."""
    task = asyncio.create_task(intake.run())
    intake.wake()
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        while asyncio.get_running_loop().time() < deadline:
            if held_key in intake.serving.queues.held() or task.done():
                break
            await asyncio.sleep(0.05)
        return held_key in intake.serving.queues.held(), (task.exception() if task.done() else None)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_requests_with_huge_ids_never_end_the_intake_loop(server_uri, db):
    """32 pending requests with 600 kB string ids (the validator allows any `_id`; `RequestSpec.id` is Any):
    one claim's `$in` of their ids is over 16 MB, pymongo raises DocumentTooLarge (not a PyMongoError)
    client-side, `Intake.run` does not catch it, and the task ends; in a daemon that ends the daemon, at
    every start while the documents are there."""
    requests = db[defaults.REQUESTS]
    for n in range(32):
        requests.insert_one(request(f"{n:02}" + "x" * 600_000, "big"))
    requests.insert_one(request(GOOD, "other"))

    async def work(adb):
        # returns once it is held: the bound only ends a loop that never gets there (a busy machine is slow)
        return await run_until(intake_for(adb, "d"), f'"{GOOD}"', 60)

    held, ended = run_with(server_uri, db.name, work)
    assert ended is None, f"the intake loop ended: {ended!r}"
    assert held


async def two_rounds(adb) -> set:
    """Two claim rounds of one intake, a failed round printed and passed over as `Intake.run` logs it and waits
    for the next wake-up; what it then holds."""
    intake = intake_for(adb, "d")
    for _ in range(2):
        try:
            await intake.round()
        except Exception as exc:  # noqa: BLE001
            print(f"round failed: {exc!r}")
    return set(intake.serving.queues.held())


def test_a_request_the_server_cannot_grow_never_blocks_the_claims_of_others(server_uri, db):
    """A pending request padded to just under 16 MB (in `output`, a listener field the validator allows in any
    shape): the claim's `update_many` cannot add `lease` and `started_at` to it, fails for the whole batch, and
    the round ends; every round finds it first again, so nobody's request is ever claimed."""
    requests = db[defaults.REQUESTS]
    requests.insert_one(request(GOOD + "-before", "other"))
    document = request("fat", "m")
    room = 16 * 1024 * 1024 - len(bson.encode({**document, "output": ""})) - 40
    requests.insert_one({**document, "output": "x" * room})
    requests.insert_one(request(GOOD, "other"))

    held = run_with(server_uri, db.name, two_rounds)
    assert {f'"{GOOD}-before"', f'"{GOOD}"'} <= held
    for doc_id in (GOOD + "-before", GOOD):
        assert requests.find_one({"_id": doc_id}, {"status": 1})["status"] == "running"


def test_a_cancelled_request_the_server_cannot_grow_never_blocks_the_claims_of_others(server_uri, db):
    """The same with `cancel: true`: its transition to `cancelled` raises out of `_choose`, before any claim."""
    requests = db[defaults.REQUESTS]
    document = request("fat", "m", cancel=True)
    room = 16 * 1024 * 1024 - len(bson.encode({**document, "output": ""})) - 8
    requests.insert_one({**document, "output": "x" * room})
    requests.insert_one(request(GOOD, "other"))


    assert f'"{GOOD}"' in run_with(server_uri, db.name, two_rounds)


def unaddressable(n: int) -> RawBSONDocument:
    """A pending request whose string `_id` is not UTF-8: the daemon's codec reads it with replacement
    characters, so no query by the id it read matches it (claim, cancel or fail)."""
    raw = bson.encode(request(f"QQQQ{n:04}", "junk"))
    return RawBSONDocument(raw.replace(b"QQQQ", b"Q\xff\xfeQ", 1))


def test_requests_no_query_can_address_never_fill_every_find(server_uri, db):
    """As many such documents as the intake has room for sit at the head of every find: none can be claimed
    or ended, each find returns only them, and no other request is ever claimed."""
    requests = db[defaults.REQUESTS]
    try:
        for n in range(8):
            requests.insert_one(unaddressable(n))
    except OperationFailure as exc:  # the embedded server checks UTF-8; MongoDB does not (MONGOTUNE_TEST_URI)
        pytest.skip(f"this server refuses strings that are not UTF-8: {exc}")
    requests.insert_one(request(GOOD, "other"))

    async def work(adb):
        intake = intake_for(adb, "d", max_queued_requests=8)
        await intake.round()
        await intake.round()
        return set(intake.serving.queues.held())

    assert f'"{GOOD}"' in run_with(server_uri, db.name, two_rounds)


def test_look_alikes_of_a_full_models_id_never_hide_other_models(server_uri, db):
    """`{"$oid": "<hex>"}` is a document, not an id, but `ids.key` writes it exactly as it writes
    `ObjectId("<hex>")`. While that model is full here, such requests count against its share, are not plain
    so `$nin` cannot leave them out, and are neither claimed nor failed: every find returns them again, and
    the lone request of another model is never claimed."""
    requests = db[defaults.REQUESTS]
    busy = ObjectId()
    requests.insert_many([request(f"busy{n}", busy) for n in range(2)])

    async def work(adb):
        intake = intake_for(adb, "d", max_queued_requests=6, max_queue_per_model=2)
        await intake.round()  # the busy model's share is now full
        requests.insert_many([{**request(f"look-alike{n}", None), "model": {"$oid": str(busy)}} for n in range(4)])
        requests.insert_one(request(GOOD, "quiet"))
        await intake.round()
        await intake.round()
        return set(intake.serving.queues.held())

    held = run_with(server_uri, db.name, work)
    assert f'"{GOOD}"' in held


def test_a_flood_of_invalid_requests_is_drained_without_waiting_for_the_scan(server_uri, db):
    """600 requests that fail once claimed (a model that is a document, which the validator allows), then a
    good one: a round ends after MAX_FINDS finds with the flood not drained, nothing wakes the intake again
    (the failed ones never reach serving, so no room is freed) and the good request waits for the periodic
    scan (`scan_s`, 30 s), once for every 256 such documents ahead of it."""
    requests = db[defaults.REQUESTS]
    requests.insert_many([{**request(f"bad{n:04}", None), "model": {"n": n}} for n in range(600)])
    requests.insert_one(request(GOOD, "other"))

    async def work(adb):
        return await run_until(intake_for(adb, "d"), f'"{GOOD}"', 60)

    held, ended = run_with(server_uri, db.name, work)
    assert ended is None
    assert held, "the good request was not claimed within 60 s (the periodic scan, which is not running, is 30 s)"
    assert requests.count_documents({"status": Status.PENDING.value}) == 0


def test_a_gpu_daemons_heartbeat_stays_small_whatever_waits():
    """On a GPU host, every pending model that finds too few GPUs free adds a line to the heartbeat's `waiting`
    (`GpuPool.take`), with no bound: 30,000 models with 512-character ids make the `_listener` record larger
    than 16 MB, the heartbeat is never written again (DocumentTooLarge, logged by `Periodic`), `alive_until`
    lapses, and every other daemon takes over this live daemon's requests every 2 s (`leases.take_over`),
    counting an attempt each time: after 3, other users' requests fail as `too_many_attempts`."""
    from listener.gpus import GpuPool

    pool = GpuPool((0,))
    for n in range(30_000):
        pool.take(f"{n:06}".ljust(512, "m"), 2)
    assert len(bson.encode(pool.heartbeat())) < 1024 * 1024


def test_a_request_set_back_to_pending_while_held_is_queued_once(server_uri, db):
    """Its writer sets a request that this daemon holds (queued or generating) back to `pending`, with
    `attempts: 0`, again and again: each time the intake claims it again and `Serving.submit` queues it once
    more, while `_held` (by id) counts it once. The copies bypass `max_queue_per_model` and
    `max_queued_requests` (a batch of 16 copies of one request, each generated, all but one answer
    dropped) and the queue grows with each write, without bound."""
    requests = db[defaults.REQUESTS]
    requests.insert_one(request("again", "m"))

    async def work(adb):
        intake = intake_for(adb, "d", max_queued_requests=4, max_queue_per_model=2)
        for _ in range(6):
            await intake.round()
            await adb[defaults.REQUESTS].update_one({"_id": "again"}, {"$set": {"status": "pending", "attempts": 0}})
        return dict(intake.serving.queues.queued()), len(intake.serving.queues.held())

    queued, held = run_with(server_uri, db.name, work)
    assert held == 1
    assert queued == {'"m"': 1}


def intake_beside_collection_jobs(adb, environ: dict | None = None, **options) -> Intake:
    """An intake whose serving would start a collection job that only waits (none starts here unless claimed)."""
    chosen = Settings.load({"db": adb.name, "validators": False, **options}, environ=environ or {})
    counters = {"requests_done": 0, "requests_failed": 0}
    serving = Serving(adb, chosen, "d", counters, Forks(gpus=False),
                      collection_job=lambda serving, spec: asyncio.Event().wait())
    return Intake(adb, chosen, "d", serving, counters, SkipLog(), stopping=lambda: False)


def test_class3_a_flood_of_junk_collection_requests_never_hides_a_lone_interactive_request(server_uri, db):
    """Re-attack 21, finding 6. The intake's one find took `sum(free)` documents for both kinds together, in
    natural order: requests over a collection inserted first filled the whole limit, the claim took only as many
    as the collection places (the rest were skipped as "its kind has no more places"), and junk ones (invalid once
    claimed) freed those places again at once. So a writer's flood of N junk collection requests kept a lone
    interactive request pending for about N / (max_collection_jobs * MAX_FINDS) rounds although every
    interactive place was free."""
    requests = db[defaults.REQUESTS]
    junk = [{"_id": f"junk{n}", "model": f"m{n}", "collection": "notes", "input": "{text}", "checkpoint": "base"}
            for n in range(40)]  # no output_field: each fails once claimed
    requests.insert_many(junk)
    requests.insert_one(request("plain", "a"))

    async def work(adb):
        intake = intake_beside_collection_jobs(adb, {"MONGOTUNE_ANSWER_COLLECTIONS": "*"}, max_queued_requests=8,
                                               max_queue_per_model=8, max_collection_jobs=1,
                                               max_collection_jobs_per_model=1)
        await intake.round()
        return [ids.key(doc_id) for doc_id in intake.serving.queues.held_ids()]

    held = run_with(server_uri, db.name, work)
    failed = requests.count_documents({"status": "failed"})
    assert ids.key("plain") in held, (f"all 8 interactive places were free, yet the round claimed only {failed} junk "
                                      f"collection requests and left the interactive one pending; held: {held}")


@pytest.mark.parametrize("field, value", [("filter", {"x": {"$in": nested(975)}}), ("input", nested(975))],
                         ids=["in-a-document", "a-top-level-array"])
def test_class3_a_request_nested_deeper_than_the_driver_decodes_never_starves_the_others(server_uri, db, field, value):
    """Re-attack 21, finding 1. The embedded server stores documents nested far deeper than MongoDB's 100 levels
    (it took 975 here), while the daemon's driver decodes a reply with Python's recursion limit: a pending request
    with a filter of ~975 nested arrays made every intake `find` that reached it fail as InvalidBSON. It stayed
    pending (nothing could read it to fail it) and was found first by every round: no other request was ever
    claimed again. Now it fails alone, by its id, naming the limit; a top-level array that deep too (the driver
    decodes those whole even when it reads only the top level: its id is read with nested values left raw)."""
    insert_nested(db[defaults.REQUESTS], {"_id": "deep", "model": "a", "input": "hi", field: value})
    db[defaults.REQUESTS].insert_one(request("plain", "b"))

    async def work(adb):
        intake = intake_beside_collection_jobs(adb)
        for _ in range(3):  # as the daemon's loop does at each wake-up: a failed round waits for the next
            try:
                await intake.round()
            except Exception as exc:  # noqa: BLE001 (Intake.run logs it and waits)
                failures.append(f"{type(exc).__name__}: {str(exc)[:80]}")
        return [ids.key(doc_id) for doc_id in intake.serving.queues.held_ids()]

    failures: list = []
    held = run_with(server_uri, db.name, work)
    assert ids.key("plain") in held, f"three rounds claimed nothing: held {held}, rounds failed with {failures}"
    assert_failed_or_left_out(db[defaults.REQUESTS], field)


@pytest.mark.parametrize("field", ["filter", "input", "params"])
def test_a_request_nested_deeper_than_mongodb_stores_fails_naming_its_field(server_uri, db, field):
    """The class, below what breaks the driver: a value nested past MongoDB's own 100 levels (which the embedded
    server stores) fails once claimed, naming its field and the limit, and is never handed to serving."""
    document = {**request("deep", "a"), field: {"x": nested(150)}}
    db[defaults.REQUESTS].insert_one(document)

    async def work(adb):
        intake = intake_for(adb, "d")
        return await intake.round()

    assert run_with(server_uri, db.name, work) == 0
    deep = db[defaults.REQUESTS].find_one({"_id": "deep"})
    assert deep["status"] == "failed" and deep["error"]["field"] == field and f"{MAX_DEPTH}" in deep["error"]["message"]


def test_class3_a_daemon_still_answers_requests_beside_one_nested_deeper_than_it_decodes(db, start_daemon):
    """Re-attack 21, finding 1, against a real `listener start`: with the deep request pending, a request for a
    model that does not exist was never even claimed (it should fail at once, naming the model). Both are
    inserted before the daemon starts, so its first scan finds them together."""
    insert_nested(db[defaults.REQUESTS], {"_id": "deep", "model": "a", "input": "hi",
                                          "filter": {"x": {"$in": nested(975)}}})
    db[defaults.REQUESTS].insert_one(request("plain", "no-such-model"))
    daemon = start_daemon()
    try:
        ended = wait_for(db[defaults.REQUESTS], "plain", finished, 90)  # claimed (running), then failed
    except TimeoutError:
        log = daemon.log()
        pytest.fail("the request was never claimed; the daemon's log says: "
                    + " | ".join(line[:160] for line in log.splitlines() if "claim" in line)[-1500:])
    assert ended["status"] == "failed"


def test_a_model_nested_deeper_than_the_driver_decodes_fails_alone_and_the_next_is_claimed(server_uri, db, tmp_path):
    """Re-attack 21, finding 1, on the models' scan: a pending model nested ~975 deep made the scan's batch fail to
    decode; read one by one, it was skipped and stayed pending, read again at every scan. Now it fails by its id,
    naming its field and the limit, and the next model is claimed."""
    deep = model("deep", PATH, data={"collection": "c", "filter": {"x": {"$in": nested(975)}}})
    insert_nested(db[defaults.MODELS], deep)
    db[defaults.MODELS].insert_one(model("good", PATH))
    assert one_scan(server_uri, db.name, tmp_path)[0] == ["good"]
    assert_failed_or_left_out(db[defaults.MODELS], "data")


def test_models_whose_id_itself_nests_deep_fail_or_are_left_out_and_every_scan_claims_the_next(server_uri, db,
                                                                                              tmp_path):
    """The class of finding 1 on `_id` itself: an id that is a document nested deeper than the driver decodes made
    the scan raise while it logged the skip (keying the id decoded it), so no model after it was considered."""
    for levels in (50, 150, 975):
        insert_nested(db[defaults.MODELS], {**model("unused", PATH), "_id": nested_document(levels)})
    db[defaults.MODELS].insert_one(model("good", PATH))
    claimed, counters = one_scan(server_uri, db.name, tmp_path)
    assert claimed == ["good"] and counters["invalid_documents"] >= 1  # an id of 50 levels is decoded, then refused
    assert one_scan(server_uri, db.name, tmp_path)[0] == []  # the next scan too passes them without raising
    statuses = [d.get("status") for d in db[defaults.MODELS].find({}, {"_id": 0, "status": 1})]
    assert sorted(statuses, key=str) == [None, "failed", "failed", "succeeded"]  # 975 deep: the server cannot update it


def test_requests_whose_id_itself_nests_deep_never_stop_the_intake(server_uri, db):
    """The same class on `_requests`: pending requests whose `_id` nests deeper than the driver decodes beside a
    good one; the good one is held and the loop goes on."""
    for levels in (150, 975):
        insert_nested(db[defaults.REQUESTS], {**request("unused", "m"), "_id": nested_document(levels)})
    db[defaults.REQUESTS].insert_one(request(GOOD, "other"))

    async def work(adb):
        return await run_until(intake_for(adb, "d"), f'"{GOOD}"', 60)

    held, ended = run_with(server_uri, db.name, work)
    assert ended is None, f"the intake loop ended: {ended!r}"
    assert held




def assert_failed_or_left_out(collection, field: str) -> None:
    """The document "deep" failed naming `field` and the limit; or, where the server cannot change it either (the
    embedded one cannot update a document ~975 deep), it stays pending, left out. Read without the deep field."""
    document = collection.find_one({"_id": "deep"}, {"status": 1, "error": 1})
    status, error = document.get("status"), document.get("error")
    assert status == "failed" and error["field"] == field and f"{MAX_DEPTH}" in error["message"] or (
        status is None or status == "pending") and error is None, (status, error)


@pytest.mark.parametrize("hand_back", ["reap", "take_over"])
def test_a_running_request_nested_deeper_than_the_server_projects_never_stops_handing_back_the_others(
        server_uri, db, hand_back):
    """The class of finding 1 on the reaper and the take-over: a running request of a dead daemon whose `history`
    (written by its user) nests ~975 deep made their find fail (the server cannot project it; read whole, the
    driver cannot decode it), so no other request of any dead daemon was handed back. Now that one is skipped."""
    expires = defaults.now() + dt.timedelta(hours=-1 if hand_back == "reap" else 1)
    running = {"status": "running", "attempts": 1, "lease": {"owner": "gone", "expires_at": expires}}
    insert_nested(db[defaults.REQUESTS], {**request("deep", "m"), **running, "history": [{"x": nested(975)}]})
    db[defaults.REQUESTS].insert_one({**request("other", "m"), **running})

    async def work(adb):
        requests, skipped = adb[defaults.REQUESTS], SkipLog()
        if hand_back == "reap":
            return await reap(requests, REQUEST_TRANSITIONS, RequestState, 3, skipped)
        return await take_over(requests, REQUEST_TRANSITIONS, RequestState, 3, skipped, adb[defaults.LISTENER], "me")

    assert run_with(server_uri, db.name, work) == 1
    assert db[defaults.REQUESTS].find_one({"_id": "other"})["status"] == "pending"
