"""GPU bookkeeping on a host, tested without GPUs: the daemon is told which device ids it has."""

import asyncio

import pytest
from click.testing import CliRunner

from listener.cli.main import cli
from listener.gpus import GpuPool
from listener.settings import Settings, SettingsError
from tests.conftest import finished, job_log, wait_for
from tests.documents import QUICK, model
from tests.test_claims import PATH, StandIn, daemon, read, until
from training import defaults


class Placed(StandIn):
    """A stand-in training that also records the devices each job was given."""

    def __init__(self):
        super().__init__()
        self.devices: dict = {}

    async def __call__(self, db, settings, model_id, run, owner, forks=None, devices=None):
        self.devices[model_id] = devices
        return await super().__call__(db, settings, model_id, run, owner)


def gpus(n: int) -> dict:
    return {**QUICK, "num_gpus": n}


def test_the_pool_hands_out_free_devices_and_says_why_a_job_waits():
    pool = GpuPool((0, 1, 2))
    assert pool.take("a", 2) == (0, 1)
    assert pool.take("b", 2) is None and pool.waiting == {"b": "needs 2 GPUs, 1 free"}
    pool.give_back("a")
    assert pool.take("b", 2) == (0, 1) and pool.waiting == {}
    assert pool.take("c", 0) == () and pool.free() == [2]


@pytest.mark.parametrize(("given", "devices"), [("0,1", (0, 1)), ("none", ()), ("", ()), (None, None)])
def test_gpus_setting(given, devices):
    assert Settings.load({"gpus": given}, environ={}).gpus == devices


def test_a_bad_gpus_setting_is_one_line():
    with pytest.raises(SettingsError, match="--gpus"):
        Settings.load({"gpus": "0,x"}, environ={})


def test_a_job_waits_while_its_gpus_are_held_and_says_so(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_many([model("one", PATH, gpus(1)), model("two", PATH, gpus(2))])
    stand_in = Placed()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, max_jobs=2, gpus="0,1") as d:
            await d._heartbeat()
            await d.scan()
            await until(lambda: stand_in.devices)  # the claimed run's task starts
            assert stand_in.devices == {"one": (0,)}, "two jobs may run side by side, but two needs both GPUs"
            await d._heartbeat()
            beat = db[defaults.LISTENER].find_one({"kind": "daemon"})
            assert beat["gpus"] == [0, 1] and beat["gpus_free"] == [1]
            assert beat["waiting"] == [{"model": '"two"', "why": "needs 2 GPUs, 1 free"}]
            shown = CliRunner().invoke(cli, ["status", "--uri", server_uri, "--db", db.name], env={"COLUMNS": "300"})
            assert shown.exit_code == 0 and '"two": needs 2 GPUs, 1 free' in shown.output, shown.output
            stand_in.finish.set()  # one ends, gives its GPU back, and the daemon scans again
            await until(lambda: "two" in stand_in.devices)
            await until(lambda: not d.trainings)
            await d._heartbeat()

    asyncio.run(body())
    assert stand_in.devices == {"one": (0,), "two": (0, 1)}
    assert db[defaults.LISTENER].find_one({"kind": "daemon"})["waiting"] == []


def test_a_job_bigger_than_every_live_host_fails_naming_the_largest(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_many([model("huge", PATH, gpus(4)), model("pair", PATH, gpus(2))])
    stand_in = Placed()
    stand_in.finish.set()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, name="big", gpus="0,1") as big, \
                daemon(server_uri, db.name, tmp_path, stand_in, name="small", gpus="0") as small:
            await big._heartbeat()
            await small._heartbeat()
            await small.scan()  # pair fits on big only: small leaves it pending
            assert read(db, "pair").get("status") is None and stand_in.devices == {}
            await big.scan()
            await until(lambda: not big.trainings)

    asyncio.run(body())
    huge = read(db, "huge")
    assert huge["status"] == "failed" and huge["error"]["field"] == "trainer.num_gpus"
    assert "largest live listener, big, has 2" in huge["error"]["message"]
    assert stand_in.devices == {"pair": (0, 1)}


def test_a_cpu_host_trains_a_one_gpu_job_on_the_cpu(server_uri, db, tmp_path):
    db[defaults.MODELS].insert_one(model("m", PATH, gpus(1)))
    stand_in = Placed()
    stand_in.finish.set()

    async def body():
        async with daemon(server_uri, db.name, tmp_path, stand_in, gpus="none") as d:
            await d._heartbeat()
            await d.scan()
            await until(lambda: not d.trainings)

    asyncio.run(body())
    assert stand_in.devices == {"m": None}, "no CUDA_VISIBLE_DEVICES: nothing to allocate"


def test_the_child_gets_its_devices_in_cuda_visible_devices(db, start_daemon, tiny_model_path, tmp_path):
    """On this CPU host the child finds no CUDA device with CUDA_VISIBLE_DEVICES=1 and trains a one-GPU job on
    the CPU, as a job of up to one GPU always may; what is checked is the device the daemon gave it."""
    from listener.demo import load_samples

    load_samples(db)
    start_daemon(args=("--gpus", "1"))
    db[defaults.MODELS].insert_one(model("m", tiny_model_path, gpus(1)))
    done = wait_for(db[defaults.MODELS], "m", finished, timeout_s=300)
    assert done["status"] == "succeeded", done.get("error")
    assert "GPUs given by the listener: CUDA_VISIBLE_DEVICES=1" in job_log(tmp_path)
