"""The other nodes' parts of a checkpoint reach rank 0's folder over the process group (two real gloo ranks on the
loopback), and what a node may send is the resume allowlist within the operator's cap."""

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from listener.embedded import free_port
from training import checkpoints, shards
from training.limits import Limits

SHARD = "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _rank(rank: int, port: int, folders: list[str]) -> None:
    """One rank of a job of two nodes of one rank each, saving at step 3."""
    import torch.distributed as dist

    os.environ.update(LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        assert shards.several_nodes()
        shards.collect(folders[rank], Limits())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns real processes
def test_node_1s_part_of_a_checkpoint_reaches_rank_0s_folder(tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    (node0 / "global_step3").mkdir(parents=True)
    (node1 / "global_step3").mkdir(parents=True)
    (node0 / "latest").write_text("global_step3")
    (node0 / "rng_state_0.pth").write_bytes(b"rank 0")
    shard = os.urandom(3 * 2**20 + 7)
    (node1 / SHARD).write_bytes(shard)
    (node1 / "rng_state_1.pth").write_bytes(b"rank 1")
    (node1 / "latest").write_text("global_step9")  # a file both nodes write: node 0's is the one kept
    (node1 / "training_args.bin").write_bytes(b"pickled")  # never archived, never sent
    (node1 / "scaler.pt").write_bytes(b"")
    mp.spawn(_rank, args=(free_port(), [str(node0), str(node1)]), nprocs=2)
    assert (node0 / SHARD).read_bytes() == shard
    assert (node0 / "rng_state_1.pth").read_bytes() == b"rank 1"
    assert (node0 / "latest").read_text() == "global_step3"
    assert (node0 / "scaler.pt").read_bytes() == b"" and not (node0 / "training_args.bin").exists()


@pytest.mark.parametrize("name", ["../rng_state_1.pth", "global_step3/../../x.pt", "training_args.bin",
                                  "/etc/passwd", "global_step3/sub/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_a_node_sends_only_names_a_resume_archive_holds(name):
    with pytest.raises(checkpoints.CheckpointRefused, match="rank 1"):
        shards._manifest(json.dumps([["rng_state_1.pth", 6], [name, 1]]).encode(), 1, Limits(), 2**20)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"[[", b'{"a": 1}', b'[["rng_state_1.pth", true]]'])
def test_a_manifest_that_is_not_a_list_of_names_and_sizes_is_refused(raw):
    with pytest.raises(checkpoints.CheckpointRefused, match="rank 1"):
        shards._manifest(raw, 1, Limits(), 2**20)


def test_a_nodes_part_stays_within_the_operators_cap():
    with pytest.raises(checkpoints.LimitExceeded, match="MONGOTUNE_MAX_CHECKPOINT_BYTES"):
        shards._manifest(json.dumps([[SHARD, 2**21]]).encode(), 1, Limits(max_checkpoint_bytes=2**20), 2**20)
    assert shards._manifest(json.dumps([[SHARD, 5]]).encode(), 1, Limits(), 5) == [(SHARD, 5)]


CAP = 2**20  # the operator's MONGOTUNE_MAX_CHECKPOINT_BYTES in the test below


def _node_rank(rank: int, port: int, folders: list[str]) -> None:
    """One rank of a job of three nodes of one rank each, saving at step 3, under a 1 MiB checkpoint cap."""
    import torch.distributed as dist

    os.environ.update(LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        shards.collect(folders[rank], Limits(max_checkpoint_bytes=CAP))
    except Exception as exc:  # rank 0's refusal, and the senders' broken connections after it: kept to be read
        (Path(folders[rank]) / "refused").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns real processes
def test_the_other_nodes_parts_together_stay_within_the_cap_on_node_0(tmp_path):
    """`MONGOTUNE_MAX_CHECKPOINT_BYTES` bounds what one checkpoint puts on node 0's disk, all nodes' parts together:
    checked one part at a time against the whole cap, a document's `num_nodes: 8` let 7 parts of almost the cap each
    be written there before the upload refused the sum. Here node 1's part (3/4 of the cap) lands, node 2's is
    refused."""
    folders = [tmp_path / f"node{n}" for n in range(3)]
    for n, folder in enumerate(folders):
        (folder / "global_step3").mkdir(parents=True)
        if n:
            (folder / f"global_step3/zero_pp_rank_{n}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(CAP * 3 // 4))
    mp.spawn(_node_rank, args=(free_port(), [str(f) for f in folders]), nprocs=3)
    refused = (folders[0] / "refused").read_text()
    assert refused.startswith("LimitExceeded") and "MONGOTUNE_MAX_CHECKPOINT_BYTES" in refused, refused
    (folders[0] / "refused").unlink()
    received = sum(p.stat().st_size for p in folders[0].rglob("*") if p.is_file())
    assert received == CAP * 3 // 4, f"{received:,} bytes on node 0 under a cap of {CAP:,}: node 1's part alone"
