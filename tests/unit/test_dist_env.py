"""resolve_dist_env: torchrun variables, SLURM srun variables, and a lone process."""

from __future__ import annotations

import os
import socket

import pytest

from megatrain.engine.dist_env import DistEnv, cuda_device_index, expand_nodelist, export_dist_env, resolve_dist_env

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}


def srun_env(**extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-04,10],cpu1"}
    env.update(extra)
    return env


def test_torchrun_variables_win_over_slurm() -> None:
    env = resolve_dist_env({**srun_env(), **TORCHRUN, "SLURM_RESTART_COUNT": "2"})
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, master_addr="node7", master_port=29400,
                          launcher="torchrun", restart_count=2)


def test_torchrun_missing_variable_is_named() -> None:
    partial = {k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}
    with pytest.raises(ValueError, match="MASTER_PORT"):
        resolve_dist_env(partial)


@pytest.mark.parametrize("name,value", [("RANK", "x"), ("WORLD_SIZE", "0"), ("MASTER_PORT", "70000"),
                                        ("LOCAL_RANK", "-1"), ("RANK", "4")])
def test_torchrun_malformed_value_is_named(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        resolve_dist_env({**TORCHRUN, name: value})


def test_slurm_srun_task() -> None:
    env = resolve_dist_env(srun_env(SLURM_RESTART_COUNT="1"))
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, master_addr="gpu03",
                          master_port=20000 + 12345 % 20000, launcher="slurm", restart_count=1)


def test_slurm_port_and_addr_overrides() -> None:
    env = resolve_dist_env(srun_env(MASTER_PORT="31000", MASTER_ADDR="10.0.0.1"))
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 31000)


def test_slurm_step_nodelist_preferred() -> None:
    assert resolve_dist_env(srun_env(SLURM_STEP_NODELIST="gpu10")).master_addr == "gpu10"


def test_slurm_port_stays_in_range_for_large_job_ids() -> None:
    assert resolve_dist_env(srun_env(SLURM_JOB_ID="987654321")).master_port == 20000 + 987654321 % 20000


def test_batch_shell_without_srun_is_single_process() -> None:
    # The batch script itself has SLURM_PROCID/SLURM_NTASKS but is not a step of N tasks.
    env = srun_env()
    del env["SLURM_STEP_ID"]
    resolved = resolve_dist_env(env)
    assert (resolved.launcher, resolved.rank, resolved.world_size) == ("single", 0, 1)


@pytest.mark.parametrize("name,value", [("SLURM_PROCID", "8"), ("SLURM_NTASKS", "two"),
                                        ("SLURM_JOB_ID", "abc"), ("SLURM_LOCALID", "")])
def test_slurm_malformed_value_is_named(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        resolve_dist_env(srun_env(**{name: value}))


def test_slurm_missing_nodelist() -> None:
    env = srun_env()
    del env["SLURM_JOB_NODELIST"]
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        resolve_dist_env(env)


@pytest.mark.parametrize("nodelist,hosts", [
    ("n1", ["n1"]),
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("a1,b[02-04]", ["a1", "b02", "b03", "b04"]),
    ("node[08-10]", ["node08", "node09", "node10"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
    ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
    ("host-a.example.com,host-b", ["host-a.example.com", "host-b"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-3", "n1]", "n[a-b]", "n[3-1]", "a,,b"])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_single_process_gets_a_free_port() -> None:
    env = resolve_dist_env({})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher, env.restart_count) == (
        0, 1, 0, "127.0.0.1", "single", 0)
    with socket.socket() as s:  # the port was free a moment ago and can be bound now
        s.bind(("127.0.0.1", env.master_port))


def test_export_writes_torch_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN:  # setenv first so monkeypatch restores (removes) them after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    export_dist_env(resolve_dist_env(srun_env()))
    assert {k: os.environ[k] for k in TORCHRUN} == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03", "MASTER_PORT": "32345"}
    assert resolve_dist_env().launcher == "torchrun"  # the exported set reads back consistently


# (launcher environment, devices torch counts under its CUDA_VISIBLE_DEVICES, expected cuda index)
@pytest.mark.parametrize("environ, visible, index", [
    ({**TORCHRUN, "LOCAL_RANK": "5"}, 8, 5),  # torchrun on an 8-GPU node: every process sees all 8
    (srun_env(SLURM_LOCALID="5", CUDA_VISIBLE_DEVICES="5"), 1, 0),  # srun --gpus-per-task=1: its GPU is cuda:0
    (srun_env(SLURM_LOCALID="7"), 8, 7),  # srun, one task per GPU, every task sees the node's GPUs
    (srun_env(SLURM_LOCALID="3", CUDA_VISIBLE_DEVICES="6,7"), 2, 1),  # --gpus-per-task=2: its second GPU
    ({}, 1, 0),  # one process
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, 2, 0),  # one process, two GPUs let through: the first visible one
], ids=["torchrun", "srun-gpus-per-task-1", "srun-all-visible", "srun-gpus-per-task-2", "single", "single-visible"])
def test_the_cuda_device_is_the_local_rank_modulo_the_visible_devices(environ, visible, index) -> None:
    assert cuda_device_index(resolve_dist_env(environ).local_rank, visible, environ) == index


def test_no_visible_cuda_device_names_cuda_visible_devices() -> None:
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES=''"):
        cuda_device_index(0, 0, {"CUDA_VISIBLE_DEVICES": ""})
