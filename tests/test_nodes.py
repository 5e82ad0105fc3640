"""One job on two daemons as two torchrun nodes (gloo over the loopback): it trains as one and resumes as one.
Forged entries and a gang's deadline are in the fast tier (tests/test_gangs.py)."""

import re
import signal

import pytest

from listener.demo import load_samples
from listener.processes import wait_until
from tests import documents
from tests.conftest import finished, wait_for
from tests.test_multiprocess import assert_gone, children
from training import defaults, ids
from training.defaults import ChildExit

FAST = {"MONGOTUNE_SCAN_S": "2"}
# Two daemons standing in for two hosts share this one's cores: one thread per rank, as torchrun gives two ranks of one
# node (each node's rank would take every core, and ZeRO-2 trained at 1.6 s a step instead of 0.15-0.19).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def model(path, _id: str, nodes: int, steps: int, **trainer) -> dict:
    return documents.model(_id, path, {**documents.QUICK, "num_nodes": nodes, "max_steps": steps,
                                       "learning_rate": 1e-3, "save_steps": 4, **trainer})


def epochs(document) -> dict[int, float]:
    return {m["step"]: m["epoch"] for m in document["metrics"] if "loss" in m}


def node_log(home, _id: str, node: int) -> str:
    found = sorted((home / "logs").glob(f"*.{_id}-*-run1{f'-node{node}' if node else ''}.log"))
    assert found, f"node {node} keeps a log of its own"
    return found[-1].read_text(errors="replace")


def test_two_nodes_train_as_one_with_twice_the_batch(db, start_daemon, tiny_model_path, tmp_path):
    load_samples(db)
    models = db[defaults.MODELS]
    start_daemon("a", max_jobs=1, env=FAST)
    start_daemon("b", max_jobs=1, env=FAST)
    models.insert_many([model(tiny_model_path, "one", 1, 8), model(tiny_model_path, "two", 2, 8)])
    one, two = (wait_for(models, _id, finished, timeout_s=600) for _id in ("one", "two"))
    assert one["status"] == two["status"] == "succeeded", (one.get("error"), two.get("error"))
    assert epochs(two)[8] == 2 * epochs(one)[8], "each step takes one batch from each of two nodes"
    assert [c["step"] for c in two["checkpoints"]] == [4, 8]
    assert [n["rank"] for n in two["runs"][-1]["nodes"]] == [0, 1]
    assert {n["name"] for n in two["runs"][-1]["nodes"]} == {"a", "b"}
    assert "nodes" not in two, "the gang goes with the run"
    logs = node_log(tmp_path, "two", 0), node_log(tmp_path, "two", 1)
    assert "as node 0 of 2" in logs[0] and "rank 0 of 2" in logs[0]
    assert "as node 1 of 2" in logs[1] and "rank 1 of 2" in logs[1]
    assert not re.search(r"checkpoint .*stored|uploaded", logs[1]), "node 1 writes nothing"


def started_agents(daemons, _id: str, count: int) -> list[int]:
    """The torchrun agents of `_id`'s nodes, each with its ranks, once `count` of them run (from the daemons' logs)."""
    def found():
        pids = [int(p) for d in daemons for p in re.findall(rf"training '{_id}' run \d+ started \(pid (\d+)", d.log())]
        return pids if len(pids) >= count else None
    return wait_until(found, 300, f"{count} nodes of {_id}")


def trained_past(document, step: int) -> bool:
    """Whether the attempt running now trained past `step`. Until its `resumed` event (written with its first
    `progress` as its ranks start training) follows its claim, `progress` is the attempt before's, and a stop timed
    by it may reach the nodes while they still load, with no step of their own to save."""
    kinds = [e.get("kind") for e in document.get("events") or []]
    since_claim = kinds[len(kinds) - kinds[::-1].index("claimed"):] if "claimed" in kinds else []
    return document.get("status") == "running" and "resumed" in since_claim \
        and (document.get("progress") or {}).get("step", 0) > step


def test_a_node_killed_outright_stops_the_other_the_run_resumes_and_sigterm_or_cancel_stops_both(
        db, start_daemon, tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    daemons = {name: start_daemon(name, max_jobs=1, env={**FAST, "MONGOTUNE_LEASE_S": "3"}) for name in "ab"}
    models.insert_one(model(tiny_model_path, "k", 2, 100_000, save_steps=3))
    running = wait_for(models, "k", lambda d: len((d.get("checkpoints") or [])) >= 1, timeout_s=300)
    node0, node1 = (n["name"] for n in running["nodes"])
    first = started_agents(daemons.values(), "k", 2)
    daemons[node1].stop(signal.SIGKILL)
    handed_back = wait_for(models, "k", lambda d: d.get("status") == "pending", timeout_s=60)
    assert handed_back["history"][-1]["event"] == "node lost" and "error" not in handed_back
    assert_gone(first)  # node 0's agent and ranks stopped within 30 s of the kill
    saved = models.find_one({"_id": "k"})["checkpoints"][-1]["step"]

    daemons["c"] = start_daemon("c", max_jobs=1, env={**FAST, "MONGOTUNE_LEASE_S": "3"})
    resumed = wait_for(models, "k", lambda d: trained_past(d, saved + 1), timeout_s=300)
    assert {n["name"] for n in resumed["nodes"]} == {node0, "c"} and resumed["attempts"] == 2
    agents = [p for p in started_agents(daemons.values(), "k", 4) if p not in first]
    assert daemons["c"].stop(signal.SIGTERM, timeout=60) == 0  # a member stopping stops the job after one save
    stopped = wait_for(models, "k", lambda d: d.get("status") == "pending", timeout_s=60)
    assert stopped["checkpoints"][-1]["step"] > saved and "error" not in stopped
    assert stopped["history"][-1] == handed_back["history"][-1], "an orderly stop costs no attempt"
    assert_gone(agents)

    daemons["d"] = start_daemon("d", max_jobs=1, env={**FAST, "MONGOTUNE_LEASE_S": "3"})
    wait_for(models, "k", lambda d: trained_past(d, stopped["checkpoints"][-1]["step"]), timeout_s=300)
    agents = [p for p in started_agents(daemons.values(), "k", 6) if p not in first + agents]
    pids = agents + [c for a in agents for c in children(a)]
    models.update_one({"_id": "k"}, {"$set": {"cancel": True}})
    done = wait_for(models, "k", finished, timeout_s=120)
    assert done["status"] == "cancelled", done.get("error")
    trained = [m["step"] for m in done["metrics"] if "loss" in m]
    assert trained.count(1) == 1, "resumed, never started over"
    assert any(e.get("kind") == "resumed" and e.get("step") == saved for e in done["events"]), done["events"]
    assert_gone(pids)


def test_a_gang_waits_for_its_last_node_and_says_so(db, start_daemon, tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    env = {**FAST, "MONGOTUNE_GANG_WAIT_S": "600"}
    daemons = {name: start_daemon(name, max_jobs=1, env=env) for name in "ab"}
    models.insert_one(model(tiny_model_path, "g", 3, 100_000))
    note = {"model": ids.key("g"), "why": "2 of 3 nodes"}
    wait_until(lambda: db[defaults.LISTENER].count_documents({"kind": "daemon", "waiting": note}) == 2, 120,
               "both daemons waiting with 2 of 3 nodes")
    assert models.find_one({"_id": "g"}).get("status", "pending") == "pending"
    daemons["c"] = start_daemon("c", max_jobs=1, env=env)
    running = wait_for(models, "g", lambda d: d.get("status") == "running", timeout_s=120)
    assert sorted(n["name"] for n in running["nodes"]) == ["a", "b", "c"]
    models.update_one({"_id": "g"}, {"$set": {"cancel": True}})  # at once: rank 0 sees it at its first step
    assert wait_for(models, "g", finished, timeout_s=300)["status"] == "cancelled"
    node0 = daemons[running["nodes"][0]["name"]]
    assert wait_until(lambda: re.search(r"ended cancelled \(exit code (\S+)\)", node0.log()), 60,
                      "node 0's end").group(1) == str(ChildExit.CANCELLED), "every rank stopped in step, none killed"


def test_two_gangs_on_three_daemons_one_runs_the_other_waits_then_runs(db, start_daemon, tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    for name in "abc":
        start_daemon(name, max_jobs=1, env={**FAST, "MONGOTUNE_GANG_WAIT_S": "3"})
    models.insert_many([model(tiny_model_path, "x", 2, 4), model(tiny_model_path, "y", 2, 4)])
    x, y = (wait_for(models, _id, finished, timeout_s=600) for _id in ("x", "y"))
    assert x["status"] == y["status"] == "succeeded", (x.get("error"), y.get("error"))
    for done in (x, y):  # three daemons hold one gang of two at a time: the other waited, then had its own
        assert len({n["name"] for n in done["runs"][-1]["nodes"]}) == 2


def stored_names(db, files_id) -> set[str]:
    """The files an archive holds, as its GridFS metadata lists them."""
    return set(db[f"{defaults.CHECKPOINTS}.files"].find_one({"_id": files_id})["metadata"]["files"])


def seconds_per_step(document, since: int) -> float:
    """The last attempt's training seconds per step it trained (from `since`), uploads included."""
    return document["runs"][-1]["phases"]["train"] / (document["progress"]["step"] - since)


def test_deepspeed_across_nodes_stores_every_ranks_states_and_resumes_when_node_0_dies(
        db, start_daemon, tiny_model_path):
    """ZeRO-2 on two nodes of one rank: each checkpoint holds both ranks' optimizer shards and RNG states (node 1's
    sent to rank 0), and with node 0's daemon SIGKILLed the run resumes on two daemons from that checkpoint."""
    pytest.importorskip("deepspeed", reason="needs the deepspeed extra")
    load_samples(db)
    models = db[defaults.MODELS]
    env = {**FAST, **ONE_THREAD, "MONGOTUNE_LEASE_S": "3"}
    daemons = {name: start_daemon(name, max_jobs=1, env=env) for name in "ab"}
    steps = 30
    models.insert_one(model(tiny_model_path, "z", 2, steps, save_steps=5,
                            deepspeed={"zero_optimization": {"stage": 2}}))
    running = wait_for(models, "z", lambda d: len(d.get("checkpoints") or []) >= 1, timeout_s=600)
    node0 = running["nodes"][0]["name"]
    first = started_agents(daemons.values(), "z", 2)
    pids = first + [c for a in first for c in children(a)]
    daemons[node0].stop(signal.SIGKILL)
    handed_back = wait_for(models, "z", lambda d: d.get("status") == "pending", timeout_s=120)
    assert handed_back["history"][-1]["event"] == "lease expired" and "error" not in handed_back, handed_back
    assert_gone(pids)  # node 1's agent and rank stopped too
    saved = models.find_one({"_id": "z"})["checkpoints"][-1]
    assert saved["step"] < steps, "killed mid-training"
    tag = f"global_step{saved['step']}"
    assert {"rng_state_0.pth", "rng_state_1.pth", f"{tag}/mp_rank_00_model_states.pt",
            f"{tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            f"{tag}/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= stored_names(db, saved["files_id"])

    daemons["c"] = start_daemon("c", max_jobs=1, env=env)
    done = wait_for(models, "z", finished, timeout_s=900)
    assert done["status"] == "succeeded" and "error" not in done, done.get("error")
    assert re.search(r"training 'z' run 1 started", daemons["c"].log()) and done["attempts"] == 2
    resumed = [e["step"] for e in done["events"] if e["kind"] == "resumed"]
    assert resumed == [saved["step"]], done["events"]
    trained = [m["step"] for m in done["metrics"] if "loss" in m]
    assert trained.count(1) == 1 and min(s for s in trained if s > saved["step"]) == saved["step"] + 1, trained
    assert done["checkpoints"][-1]["step"] == steps
    print(f"ZeRO-2 on 2 nodes of 1 rank: {seconds_per_step(done, saved['step']):.2f} s/step after the resume")


def test_fsdp_across_nodes_stores_both_ranks_states_and_resumes_after_a_member_stops(db, start_daemon,
                                                                                     tiny_model_path):
    load_samples(db)
    models = db[defaults.MODELS]
    daemons = {name: start_daemon(name, max_jobs=1, env={**FAST, **ONE_THREAD}) for name in "ab"}
    steps = 60
    models.insert_one(model(tiny_model_path, "f", 2, steps, save_steps=100_000, fsdp=True, fsdp_config={"version": 2}))
    running = wait_for(models, "f", lambda d: (d.get("progress") or {}).get("step", 0) > 2, timeout_s=600)
    member = running["nodes"][1]["name"]
    assert daemons[member].stop(signal.SIGTERM, timeout=60) == 0  # both nodes save once and stop
    stopped = wait_for(models, "f", lambda d: d.get("status") == "pending", timeout_s=60)
    saved = stopped["checkpoints"][-1]
    assert 2 < saved["step"] < steps and "error" not in stopped, stopped.get("error")
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= stored_names(db, saved["files_id"])

    daemons["c"] = start_daemon("c", max_jobs=1, env={**FAST, **ONE_THREAD})
    done = wait_for(models, "f", finished, timeout_s=600)
    assert done["status"] == "succeeded", done.get("error")
    trained = [m["step"] for m in done["metrics"] if "loss" in m]
    assert trained.count(1) == 1 and min(s for s in trained if s > saved["step"]) == saved["step"] + 1, trained
    assert done["checkpoints"][-1]["step"] == steps
