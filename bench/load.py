"""Load: serving throughput and latency with one, two and three daemons on one database, and with daemons killed.

Each scenario gets a fresh database on the bench's own server, one served model (its base model, no
training) and its own `listener start` daemons, warmed up first (each has answered a request, so its
serving worker runs and start-up is not timed). Requests then arrive at a fixed rate (`RATE` a second, above
one daemon's capacity, so more daemons can show what they add; the kill scenario at `KILL_RATE`, which they keep up with,
a wave every `WAVE_S`) whatever the daemons manage, as users insert them; each is timed from the moment
this client inserts it to the moment a change stream on `_requests` shows it final (no polling).

Per scenario: answered per second (first insert to last answer), latency p50/p99, exactly-once (status
`done` and one `done` event per request), database operations per answer from the server's
`serverStatus.opcounters` (the embedded server keeps them; they are server-wide, so they include this
client's inserts and change stream), and CPU seconds per process class (daemons, the fork servers and
serving workers below them, the server, this client) from /proc, sampled every `SAMPLE_S` in a thread so
a killed daemon's CPU is read shortly before it dies (a process living less than that is missed). In
the kill scenario the oldest daemon is SIGKILLed every `KILL_EVERY_S` while requests are inserted and a
replacement started at once; what a killed one had claimed is requeued by another daemon at its next
take-over tick (every heartbeat, 2 s by default), since all run on this host and see its process gone
(`listener.liveness`; elsewhere, once its heartbeat has stopped for four intervals, about 8 s), and a
replacement claims nothing before its serving worker runs (`Seat.warm_up`). Also: `listener start` to the first answer, on a database with one pending request.

Always the tiny model unless `--model` says otherwise: this measures daemons and database, not
generation. Not part of `make bench`: `python -m bench --only load` (5 minutes on 2 CPUs that other work kept busy).
"""

import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from bson import ObjectId

from bench.common import Context, Row, running_daemon, step
from bench.serving import FINAL, spread
from listener.processes import wait_until
from training import defaults

RATE = 200  # requests a second: above what one daemon answers here (about 100 a second with the tiny model)
KILL_RATE = 60  # with kills: what the daemons keep up with, so latency shows the kills and not a backlog
WAVE_S = 0.5  # inserted together every this often
TOTAL = 1_200  # requests per scenario without faults (6 s of arrivals)
KILL_TOTAL = 720  # with kills: 12 s of arrivals, three kills at the default interval
KILL_EVERY_S = 3.0
MAX_NEW_TOKENS = 4
SAMPLE_S = 0.5  # CPU sampling interval
ANSWER_TIMEOUT_S = 240.0  # after the last insert; covers a killed daemon's takeover, or its request lease
WARM_TIMEOUT_S = 300.0
LEFTOVER_WAIT_S = 10.0
GRACE_S = 1.0  # watched after the last answer, so a second `done` for a request would be seen
MODEL_ID = "load"
PROMPTS = ("hello", "what is a database?", "say yes", "count to three")
OPS = ("insert", "query", "update", "delete", "getmore", "command")
CLASSES = ("daemons", "workers", "server", "client")  # this run's processes; `elsewhere` is the rest of the machine
WORKER_STARTED = "serving worker started"  # a daemon's log line once its worker runs
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    name: str  # the database's suffix and the daemons' name prefix
    label: str
    daemons: int
    total: int
    rate: int = RATE
    kill_every_s: float | None = None


SCENARIOS = (Scenario("one", "1 daemon", 1, TOTAL), Scenario("two", "2 daemons", 2, TOTAL),
             Scenario("three", "3 daemons", 3, TOTAL),
             Scenario("kill", f"3 daemons, one SIGKILLed every {KILL_EVERY_S:g} s", 3, KILL_TOTAL, KILL_RATE,
                      KILL_EVERY_S))


@dataclass
class Outcome:
    answered_per_s: float
    inserted_per_s: float  # below `RATE` when this client, starved of CPU, fell behind its schedule
    latencies_ms: list[float]
    ops: dict[str, int]
    cpu_s: dict[str, float]
    done: int
    once: int  # done, with exactly one `done` event
    failed: int
    reclaimed: int  # claimed more than once: its first daemon died holding it
    kills: int
    inside: str  # where a done request's time went in the daemon, from what it wrote


def served_model(ctx: Context) -> dict:
    """A model document that is already trained: the daemons serve its base and never train it."""
    return {"_id": MODEL_ID, "model_name_or_path": ctx.model_path, "data": {"collection": "docs"},
            "status": "succeeded", "checkpoints": []}


def requests_for(count: int) -> list[dict]:
    """Short greedy requests with their ids made here, so the change stream can wait for them before insert."""
    return [{"_id": ObjectId(), "model": MODEL_ID, "input": PROMPTS[n % len(PROMPTS)], "checkpoint": "base",
             "params": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}} for n in range(count)]


class Answers:
    """Final-status events for the given requests, read from a change stream in a thread: (status, when seen)."""

    def __init__(self, requests, ids: Iterable):
        self.seen: dict = {i: [] for i in ids}
        self.waiting = set(self.seen)
        self.all_final = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._stream = requests.watch([{"$match": {"operationType": "update",
                                                   "updateDescription.updatedFields.status": {"$in": FINAL}}}],
                                      max_await_time_ms=200)
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> "Answers":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._stream.close()

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                change = self._stream.try_next()
                if change is None or change["documentKey"]["_id"] not in self.seen:
                    continue
                request_id = change["documentKey"]["_id"]
                self.seen[request_id].append((change["updateDescription"]["updatedFields"]["status"], time.monotonic()))
                self.waiting.discard(request_id)
                if not self.waiting:
                    self.all_final.set()
        except BaseException as exc:  # handed to `wait`, which the main thread calls
            self.error = exc
            self.all_final.set()

    def wait(self, timeout_s: float) -> None:
        self.all_final.wait(timeout_s)
        if self.error:
            raise self.error
        if self.waiting:
            raise TimeoutError(f"{len(self.waiting)} of {len(self.seen)} requests not answered within {timeout_s:g} s")

    def answered_at(self, request_id) -> float:
        return self.seen[request_id][0][1]


def ask(db, documents: list[dict], timeout_s: float = ANSWER_TIMEOUT_S) -> None:
    """Insert the requests at once and wait until every one is final; RuntimeError unless all are done."""
    requests = db[defaults.REQUESTS]
    with Answers(requests, [d["_id"] for d in documents]) as answers:
        requests.insert_many(documents)
        answers.wait(timeout_s)
    bad = requests.find_one({"_id": {"$in": list(answers.seen)}, "status": {"$ne": "done"}})
    if bad:
        raise RuntimeError(f"request {bad['status']}: {bad.get('error')}")


class Fleet:
    """A scenario's daemons, each entered through `running_daemon` on one stack: stopped at its end, even on failure."""

    def __init__(self, ctx: Context, stack: ExitStack):
        self.ctx, self.stack = ctx, stack
        self.live: list[tuple[str, subprocess.Popen]] = []
        self.started = 0

    def start(self) -> None:
        name = f"{self.ctx.db.name}-d{self.started}"
        self.started += 1
        self.live.append((name, self.stack.enter_context(running_daemon(self.ctx, name))))

    def warm(self) -> bool:
        """Whether every live daemon has started its serving worker (what its first request waits for)."""
        return all(WORKER_STARTED in (self.ctx.home / f"{name}-daemon.log").read_text(errors="replace")
                   for name, _ in self.live)

    def replace_oldest(self) -> None:
        """SIGKILL the longest-running daemon and start another at once, as a supervisor restarting a host would."""
        _, victim = self.live.pop(0)
        victim.kill()
        victim.wait()
        self.start()


def _proc_stats() -> dict[int, tuple[int, int, int, bool]]:
    """Every process's (parent, CPU ticks in user and kernel mode, start time, whether it runs) from /proc.

    An exited process nobody reaped (here an orphan: this machine's init does not reap) is listed as a zombie."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        found[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]),
                                        fields[0] not in ("Z", "X"))
    return found


def _busy_ticks() -> int:
    """CPU ticks the whole machine has spent busy, from /proc/stat: user to steal less idle and I/O wait (the guest
    columns after steal are counted in user already)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class CpuSampler:
    """CPU seconds of this run's process classes while it is entered, sampled every `SAMPLE_S` in a thread.

    A process is classed once, by the child of this process it descends from: the server, a daemon of
    `db_name` (itself, or a worker: its fork server and what that forks), and kept by (pid, start time),
    so a daemon killed later, or a worker orphaned, still counts with what was read last. What the rest of the
    machine spent meanwhile (other people's work on a shared host) is reported beside them as `elsewhere`.
    """

    def __init__(self, db_name: str):
        self.tag = f"--db\0{db_name}\0".encode()
        self.kinds: dict[tuple[int, int], str] = {}
        self.first: dict[tuple[int, int], int] = {}
        self.last: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.machine = [0, 0]  # busy ticks at enter and exit

    def __enter__(self) -> "CpuSampler":
        self.machine[0] = _busy_ticks()
        self.sample(baseline=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.machine[1] = _busy_ticks()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self, baseline: bool = False) -> None:
        stats = _proc_stats()
        for pid, (_, ticks, started, _) in stats.items():
            key = (pid, started)
            kind = self.kinds.get(key) or self._kind(pid, stats)
            if kind:
                self.kinds[key] = kind
                self.first.setdefault(key, ticks if baseline else 0)  # started during the scenario: all of it
                self.last[key] = ticks

    def _kind(self, pid: int, stats: dict) -> str | None:
        if pid == os.getpid():
            return "client"
        chain = [pid]
        while chain[-1] in stats and stats[chain[-1]][0] not in (os.getpid(), 0):
            chain.append(stats[chain[-1]][0])
        if chain[-1] not in stats or stats[chain[-1]][0] != os.getpid():
            return None  # not started by this run, or its ancestor is gone already
        top = _cmdline(chain[-1])
        if b"secantusd" in top:
            return "server"
        if self.tag in top:
            return "daemons" if len(chain) == 1 else "workers"
        return None

    def seconds(self) -> dict[str, float]:
        ours = {kind: sum(self.last[key] - self.first[key] for key, k in self.kinds.items() if k == kind) / CLOCK_TICKS
                for kind in CLASSES}
        return {**ours, "elsewhere": (self.machine[1] - self.machine[0]) / CLOCK_TICKS - sum(ours.values())}

    def running(self) -> list[tuple[int, str]]:
        """This run's daemons and workers that still run, with their class."""
        stats = _proc_stats()
        return [(pid, kind) for (pid, started), kind in self.kinds.items()
                if kind in ("daemons", "workers") and stats.get(pid, (0, 0, None, False))[2:] == (started, True)]

    def stop_leftovers(self, console) -> None:
        """SIGKILL what outlived its daemon by `LEFTOVER_WAIT_S` (a worker dies with its daemon): the run leaves none."""
        try:
            wait_until(lambda: not self.running(), LEFTOVER_WAIT_S, "the end of the scenario's processes")
        except TimeoutError:
            for pid, kind in self.running():
                console.log(f"[yellow]a process of the {kind} ({pid}) outlived its scenario by "
                            f"{LEFTOVER_WAIT_S:g} s: killed")
                os.kill(pid, signal.SIGKILL)


def arrive(requests, documents: list[dict], inserted: dict, rate: int) -> None:
    """Insert `documents` in waves of `rate * WAVE_S` every `WAVE_S`, as a steady stream of users would: a late
    wave goes at once and the next keeps the schedule. `inserted` gets each request's insert time."""
    size = round(rate * WAVE_S)
    began = time.monotonic()
    for n, at in enumerate(range(0, len(documents), size)):
        time.sleep(max(0.0, began + n * WAVE_S - time.monotonic()))
        wave, sent = documents[at:at + size], time.monotonic()
        requests.insert_many(wave)
        inserted.update((d["_id"], sent) for d in wave)


def kill_while(fleet: Fleet, every_s: float, arrived: threading.Event) -> int:
    """Replace a daemon every `every_s` (on a schedule: a replacement's start-up does not push the next kill back)
    until the last request is inserted; how many were killed."""
    kills, began = 0, time.monotonic()
    while not arrived.wait(max(0.0, began + (kills + 1) * every_s - time.monotonic())):
        fleet.replace_oldest()
        kills += 1
    return kills


def warm_up(fleet: Fleet, db) -> None:
    """Waves of requests until every daemon has started its serving worker, so the scenario times no start-up."""
    def answered_and_warm() -> bool:
        ask(db, requests_for(3 * len(fleet.live)))
        return fleet.warm()

    wait_until(answered_and_warm, WARM_TIMEOUT_S, "every daemon's first answer", poll_s=0)


def opcounters(client) -> dict[str, int]:
    counters = client.admin.command("serverStatus")["opcounters"]
    return {op: counters[op] for op in OPS}


def measure(ctx: Context, scenario: Scenario, fleet: Fleet, cpu: CpuSampler) -> Outcome:
    """The scenario's requests at its rate, with kills if it has them, until every one is final."""
    requests, documents, inserted = ctx.db[defaults.REQUESTS], requests_for(scenario.total), {}
    arrived = threading.Event()
    before = opcounters(ctx.db.client)
    with Answers(requests, [d["_id"] for d in documents]) as answers, ThreadPoolExecutor(1) as pool:
        with cpu:
            killer = pool.submit(kill_while, fleet, scenario.kill_every_s, arrived) if scenario.kill_every_s else None
            try:
                arrive(requests, documents, inserted, scenario.rate)
            finally:
                arrived.set()
            kills = killer.result() if killer else 0
            answers.wait(ANSWER_TIMEOUT_S)
            after = opcounters(ctx.db.client)
        time.sleep(GRACE_S)
    return outcome(requests, documents, inserted, answers, {op: after[op] - before[op] for op in OPS},
                   cpu.seconds(), kills)


def outcome(requests, documents, inserted: dict, answers: Answers, ops: dict, cpu_s: dict, kills: int) -> Outcome:
    ids = [d["_id"] for d in documents]
    stored = {d["_id"]: d for d in requests.find({"_id": {"$in": ids}},
                                                 {"status": 1, "attempts": 1, "batch_size": 1, "timing": 1})}
    done = [i for i in ids if stored[i]["status"] == "done"]
    queued, generating = (statistics.median(stored[i]["timing"][key] * 1000 for i in done)
                          for key in ("queued_s", "generation_s"))
    first, last = min(inserted.values()), max(answers.answered_at(i) for i in ids)
    return Outcome(
        answered_per_s=len(done) / (last - first),
        inserted_per_s=len(ids) / (max(inserted.values()) - first + WAVE_S),
        latencies_ms=[(answers.answered_at(i) - inserted[i]) * 1000 for i in ids],
        ops=ops, cpu_s=cpu_s, done=len(done),
        once=sum([status for status, _ in answers.seen[i]].count("done") == 1 for i in done),
        failed=sum(stored[i]["status"] == "failed" for i in ids),
        reclaimed=sum(stored[i].get("attempts", 1) > 1 for i in ids), kills=kills,
        inside=f"claim to generate p50 {queued:.0f} ms, generate p50 {generating:.0f} ms, "
               f"batches of {statistics.mean(stored[i]['batch_size'] for i in done):.1f} on average")


def scenario_db(ctx: Context, name: str) -> Context:
    """The context on a fresh database of the same server, holding the served model."""
    db = ctx.db.client[f"load-{name}"]
    db[defaults.MODELS].insert_one(served_model(ctx))
    return replace(ctx, db=db)


def run_scenario(ctx: Context, scenario: Scenario) -> Outcome:
    ctx = scenario_db(ctx, scenario.name)
    cpu = CpuSampler(ctx.db.name)
    try:
        with ExitStack() as stack:
            fleet = Fleet(ctx, stack)
            with step(ctx.console, f"load: starting and warming {scenario.label}"):
                for _ in range(scenario.daemons):
                    fleet.start()
                warm_up(fleet, ctx.db)
            with step(ctx.console, f"load: {scenario.total} requests at {scenario.rate}/s, {scenario.label}"):
                return measure(ctx, scenario, fleet, cpu)
    finally:
        cpu.stop_leftovers(ctx.console)


def first_answer_s(ctx: Context) -> float:
    """From spawning `listener start` on a database with one pending request to that request seen done."""
    ctx = scenario_db(ctx, "start")
    document = requests_for(1)[0]
    requests = ctx.db[defaults.REQUESTS]
    requests.insert_one(document)
    with Answers(requests, [document["_id"]]) as answers, ExitStack() as stack:
        with step(ctx.console, "load: listener start to its first answer"):
            started = time.monotonic()
            stack.enter_context(running_daemon(ctx, ctx.db.name))
            answers.wait(ANSWER_TIMEOUT_S)
    return answers.answered_at(document["_id"]) - started


def rows(scenario: Scenario, result: Outcome, one: Outcome) -> list[Row]:
    """Each scenario against one daemon (the one-daemon rate against the offered rate)."""
    p50, p99, _ = spread(result.latencies_ms)
    one_p50, one_p99, _ = spread(one.latencies_ms)
    n = scenario.total
    killed = f"; {result.kills} daemons killed, {result.reclaimed} requests claimed again" if scenario.kill_every_s else ""
    rate_base, rate_note = (RATE, "baseline: the offered rate") if result is one else (one.answered_per_s, "vs 1 daemon")
    ops, cpu = sum(result.ops.values()), sum(result.cpu_s[kind] for kind in CLASSES)
    return [
        Row(f"load: answered/s, {scenario.label}", "req/s", result.answered_per_s, rate_base,
            f"{rate_note}; inserted at {result.inserted_per_s:.0f}/s; {result.once}/{n} done exactly once, "
            f"{result.failed} failed{killed}"),
        Row(f"load: insert to done p50, {scenario.label}", "ms", p50, one_p50,
            f"seen through a change stream; in the daemon: {result.inside}"),
        Row(f"load: insert to done p99, {scenario.label}", "ms", p99, one_p99, f"max {max(result.latencies_ms):.0f} ms"),
        Row(f"load: database ops per answer, {scenario.label}", "ops", ops / result.done,
            sum(one.ops.values()) / one.done,
            "serverStatus opcounters, server-wide: " + ", ".join(f"{op} {count / result.done:.2f}"
                                                                 for op, count in result.ops.items())),
        Row(f"load: CPU per answer, {scenario.label}", "ms", cpu * 1000 / result.done,
            sum(one.cpu_s[kind] for kind in CLASSES) * 1000 / one.done,
            "CPU s: " + ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in result.cpu_s.items())),
    ]


def run(ctx: Context) -> list[Row]:
    start_s = first_answer_s(ctx)
    results = {scenario: run_scenario(ctx, scenario) for scenario in SCENARIOS}
    one = results[SCENARIOS[0]]
    return [*(row for scenario, result in results.items() for row in rows(scenario, result, one)),
            Row("load: listener start to first answer", "s", start_s, spread(one.latencies_ms)[0] / 1000,
                "a fresh daemon, one pending request; baseline: a warm daemon's median insert to done")]
