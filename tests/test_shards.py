"""The other nodes' parts of a checkpoint reach rank 0's folder over the process group (two real gloo ranks on the
loopback), and what a node may send is the resume allowlist within the operator's cap."""

import json
import os

import pytest
import torch.multiprocessing as mp

from listener.embedded import free_port
from training import checkpoints, shards
from training.limits import Limits

SHARD = "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _rank(rank: int, port: int, folders: list[str]) -> None:
    """One rank of a job of two nodes of one rank each, saving at step 3."""
    import torch.distributed as dist

    os.environ.update(GROUP_RANK=str(rank), LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        assert shards.several_nodes()
        shards.collect(folders[rank], Limits())
    finally:
        dist.destroy_process_group()


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


def test_a_nodes_part_stays_within_the_operators_cap():
    with pytest.raises(checkpoints.LimitExceeded, match="MONGOTUNE_MAX_CHECKPOINT_BYTES"):
        shards._manifest(json.dumps([[SHARD, 2**21]]).encode(), 1, Limits(max_checkpoint_bytes=2**20), 2**20)
    assert shards._manifest(json.dumps([[SHARD, 5]]).encode(), 1, Limits(), 5) == [(SHARD, 5)]


CAP = 2**20  # the operator's MONGOTUNE_MAX_CHECKPOINT_BYTES in the test below


def _node_rank(rank: int, port: int, folders: list[str]) -> None:
    """One rank of a job of three nodes of one rank each, saving at step 3, under a 1 MiB checkpoint cap."""
    import torch.distributed as dist

    os.environ.update(GROUP_RANK=str(rank), LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        shards.collect(folders[rank], Limits(max_checkpoint_bytes=CAP))
    finally:
        dist.destroy_process_group()


def test_class3_node_0_takes_each_other_nodes_part_up_to_the_whole_cap_so_n_nodes_write_n_times_it(tmp_path):
    """An operator expects `MONGOTUNE_MAX_CHECKPOINT_BYTES` to bound what one checkpoint puts on node 0's disk: each
    node's part is checked against the whole cap on its own, so a document's `num_nodes: 8` lets 7 parts of almost
    the cap each be written there before the upload refuses the sum."""
    folders = [tmp_path / f"node{n}" for n in range(3)]
    for n, folder in enumerate(folders):
        (folder / "global_step3").mkdir(parents=True)
        if n:
            (folder / f"global_step3/zero_pp_rank_{n}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(CAP * 3 // 4))
    try:
        mp.spawn(_node_rank, args=(free_port(), [str(f) for f in folders]), nprocs=3)
    except mp.ProcessRaisedException:
        pass  # rank 0 refusing what passes the cap is what is expected
    received = sum(p.stat().st_size for p in folders[0].rglob("*") if p.is_file())
    assert received <= CAP, f"{received:,} bytes on node 0 under a cap of {CAP:,}"
