"""One job on two daemons as two torchrun nodes (gloo over the loopback): it trains as one and resumes as one."""

import re

from listener.demo import load_samples
from tests import documents
from tests.conftest import finished, wait_for
from training import defaults

FAST = {"MONGOTUNE_SCAN_S": "2", "MONGOTUNE_RENDEZVOUS_PORTS": "29400-29499"}


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

