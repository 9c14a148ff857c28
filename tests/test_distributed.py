"""Several processes on CPU (gloo): each test starts its 2 ranks itself, as torchrun would.

The 2-rank checks of tests/dist_worker.py run once per session (one start-up of two Python
processes) and each test below asserts on what the ranks saved.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moco import distributed as du
from moco.checkpoint import load_checkpoint
from moco.config import ConfigError, load_config
from moco.data.datasets import InMemoryLoader, TensorImageDataset, make_loader
from moco.evaluate.knn import knn_accuracy
from moco.methods import METHODS, build_method, sync_bn_choice
from tests import dist_worker
from tests.conftest import needs_fashion_mnist
from tests.tiny import fake_image_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.widths=[4,8,8,8]", "model.K=256", "model.bn_splits=2", "optim.batch_size=64",
    "data.train_subset=1000", "data.val_size=200", "data.test_subset=300", "train.knn_bank_size=500",
    "train.progress=false", "train.tensorboard=false",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """Start ``python ARGS`` once per rank with the environment torchrun would give it."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    fake_image_folder(out / "images", train=24)  # the folder both ranks open
    procs = start_ranks(["-m", "tests.dist_worker", str(out)])
    for proc in procs:
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


# --- one process with the global batch == two processes with half of it each ---------------------
def _single_process_run(symmetric: bool, with_local_views: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = dist_worker.linear_moco()
    optimizer = dist_worker.sgd(model.encoder_q.parameters())
    losses = []
    for step in range(dist_worker.STEPS):
        x1, x2 = dist_worker.equivalence_inputs(step)
        if symmetric or with_local_views:
            local = dist_worker.local_views(step) if with_local_views else []
            loss = model.contrastive_loss(x1, x2, symmetric=symmetric, local_views=local).loss
        else:
            logits, labels = model(x1, x2)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, dist_worker.final_state(model)


@pytest.mark.parametrize("scenario, symmetric, local", [("reference_ddp", False, False),
                                                      ("training_step_symmetric", True, False),
                                                      ("training_step_local_views", False, True)])
def test_two_processes_with_half_batches_match_one_process_with_the_global_batch(
        ranks: list[dict[str, Any]], scenario: str, symmetric: bool, local: bool) -> None:
    losses, state = _single_process_run(symmetric, local)
    assert len(set(losses)) == len(losses) and losses[0] != pytest.approx(losses[-1], abs=1e-3)  # it trains
    for result in ranks:
        got = result[scenario]
        assert got["losses"] == pytest.approx(losses, abs=1e-5)
        assert set(got["state"]) == set(state)
        for name, value in state.items():  # encoder_q, encoder_k, queue and queue_ptr
            torch.testing.assert_close(got["state"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    expected_ptr = dist_worker.STEPS * dist_worker.GLOBAL_BATCH * (2 if symmetric else 1) % 32
    assert int(state["queue_ptr"]) == expected_ptr


def test_moco_v3_on_two_processes_equals_one_process_with_the_global_batch(ranks: list[dict[str, Any]]) -> None:
    single = dist_worker.moco_v3_scenario(world=False)
    assert single["losses"][0] != pytest.approx(single["losses"][-1], abs=1e-3)  # it trains
    for rank, result in enumerate(ranks):
        got = result["moco_v3"]
        assert got["losses"] == pytest.approx(single["losses"], abs=1e-5)
        for name, value in single["state"].items():  # encoder_q, encoder_k (cosine m), predictor
            torch.testing.assert_close(got["state"][name], value, rtol=1e-5, atol=1e-5, msg=name)
        half = dist_worker.GLOBAL_BATCH // 2  # each query's positive is its own key among all ranks' keys
        assert torch.equal(got["labels"], torch.arange(half).repeat(2) + half * rank)


def test_simclr_gathers_negatives_with_gradients_like_one_process_with_the_global_batch(
        ranks: list[dict[str, Any]]) -> None:
    single = dist_worker.simclr_scenario(world=False)
    assert single["losses"][0] != pytest.approx(single["losses"][-1], abs=1e-3)  # it trains
    for result in ranks:
        got = result["simclr"]
        assert got["losses"] == pytest.approx(single["losses"], abs=1e-5)
        for step, (a, b) in enumerate(zip(got["grads"], single["grads"])):  # DDP's averaged gradients
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"gradient at step {step}")
        for name, value in single["state"].items():
            torch.testing.assert_close(got["state"][name], value, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", dist_worker.SEVERAL_PROCESS_METHODS)
def test_every_method_on_two_processes_with_different_data_equals_one_process(ranks: list[dict[str, Any]],
                                                                               name: str) -> None:
    """Each rank holds half of a batch whose halves differ (scale, offset): loss, every gradient
    and the state after the steps (weights, targets, queue, bank, prototypes) equal one process
    with the whole batch."""
    single = dist_worker.every_method_scenario(name, world=False)
    assert single["losses"][0] != pytest.approx(single["losses"][1], abs=1e-4)  # the first step changed something
    for result in ranks:
        got = result["every_method"][name]
        assert got["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
        for step, (mine, alone) in enumerate(zip(got["grads"], single["grads"])):
            assert set(mine) == set(alone) and alone
            for key, value in alone.items():
                torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-6, msg=f"{key} gradient, step {step}")
        assert set(got["state"]) == set(single["state"])
        for key, value in single["state"].items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_under_torchrun_only_rank_0_reads_an_image_folders_headers(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ranks[0]["folder_scan"], ranks[1]["folder_scan"]
    assert (r0["headers_read"], r1["headers_read"]) == (24, 0)  # rank 1 read rank 0's index
    assert r0["images"] == r1["images"] == 24 and torch.equal(r0["labels"], r1["labels"])


# --- cross-process shuffle BN --------------------------------------------------------------------
def test_cross_process_shuffle_is_a_shared_permutation_and_unshuffle_inverts_it(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ranks[0]["shuffle"], ranks[1]["shuffle"]
    all_ids = torch.cat([r0["ids"], r1["ids"]]).flatten()
    assert torch.equal(r0["idx_unshuffle"], r1["idx_unshuffle"])  # rank 0's permutation, broadcast
    perm = torch.argsort(r0["idx_unshuffle"])
    for rank, got in enumerate((r0, r1)):
        assert torch.equal(got["shuffled"].flatten(), all_ids[perm.view(2, 8)[rank]])
        assert torch.equal(got["restored"], got["ids"])  # exactly this rank's samples, original order
    shuffled = torch.cat([r0["shuffled"], r1["shuffled"]]).flatten()
    assert sorted(shuffled.tolist()) == list(range(16)) and not torch.equal(shuffled, all_ids)


def test_shuffle_bn_normalises_each_rank_with_a_batch_mixed_from_both_ranks(ranks: list[dict[str, Any]]) -> None:
    inputs = torch.cat([r["shuffle"]["bn_input"] for r in ranks])  # rank 0's rows near 0, rank 1's near 10
    origin = {tuple(row.tolist()): i for i, row in enumerate(inputs)}
    expected_out = torch.empty_like(inputs)
    seen_rows: list[int] = []
    for r in ranks:
        got = r["shuffle"]
        rows = [origin[tuple(row.tolist())] for row in got["bn_saw"]]
        assert {i // 8 for i in rows} == {0, 1}  # this rank's BN saw samples of both ranks
        seen_rows += rows
        expected_out[rows] = F.batch_norm(got["bn_saw"], None, None, training=True, eps=1e-5)
        torch.testing.assert_close(got["bn_running_mean"], 0.1 * got["bn_saw"].mean(0))
    assert sorted(seen_rows) == list(range(16))  # every sample encoded exactly once
    torch.testing.assert_close(torch.cat([r["shuffle"]["bn_out"] for r in ranks]), expected_out)
    # Plain per-rank BN would have normalised each rank with its own samples only: different output.
    local = torch.cat([F.batch_norm(r["shuffle"]["bn_input"], None, None, training=True) for r in ranks])
    assert not torch.allclose(local, expected_out, atol=1e-2)


# --- the queue is one queue --------------------------------------------------------------------
def test_queue_pointer_and_key_encoder_are_identical_on_both_ranks_after_several_steps(
        ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ranks[0]["queue_sync"], ranks[1]["queue_sync"]
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["queue_ptr"], r1["queue_ptr"])
    assert int(r0["queue_ptr"]) == 4 * 8 % 48  # 4 steps x (2 ranks x 4 keys)
    for name, value in r0["encoder_k"].items():
        assert torch.equal(value, r1["encoder_k"][name]), name
    torch.manual_seed(0)
    initial = dist_worker.MoCo(lambda num_classes: dist_worker.tiny_resnet(num_classes, bn_splits=2),
                               dim=8, K=48, mlp=True).queue
    assert not torch.allclose(r0["queue"][:, :32], initial[:, :32]) and torch.equal(r0["queue"][:, 32:], initial[:, 32:])
    torch.testing.assert_close(r0["queue"].norm(dim=0), torch.ones(48))


def test_debug_sync_check_catches_a_rank_whose_queue_drifted(ranks: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(ranks):
        assert result["queue_sync"]["drift_error"] == f"rank {rank}: state differs from rank 0's: queue on rank 1"


def test_memory_bank_is_one_bank_across_ranks_and_end_to_end_refuses_several(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ranks[0]["memory_bank"], ranks[1]["memory_bank"]
    assert torch.equal(r0["bank"], r1["bank"])
    changed = (r0["bank"] != r0["initial"]).any(dim=1)
    assert changed.nonzero().flatten().tolist() == list(range(18))  # both ranks' images, nothing else
    torch.testing.assert_close(r0["bank"].norm(dim=1), torch.ones(20))
    assert "end_to_end runs on one process" in r0["e2e_error"]


# --- evaluation and options ----------------------------------------------------------------------
def test_knn_from_sharded_features_equals_the_single_process_knn(ranks: list[dict[str, Any]]) -> None:
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(51, 8, generator=g), dim=1)
    bank_y = torch.randint(0, 4, (51,), generator=g)
    queries = F.normalize(torch.randn(23, 8, generator=g), dim=1)
    query_y = torch.randint(0, 4, (23,), generator=g)
    expected = knn_accuracy(bank, bank_y, queries, query_y, k=5, temperature=0.1, num_classes=4)
    for result in ranks:
        assert result["knn"]["bank_rows"] == 51
        assert result["knn"]["accuracy"] == pytest.approx(expected, abs=1e-4)  # float32 means
        assert [o["rank"] for o in result["knn"]["objects"]] == [0, 1]
        assert result["knn"]["objects"][1]["t"].tolist() == [1.0, 1.0]


def test_split_bn_groups_count_in_the_global_batch(ranks: list[dict[str, Any]]) -> None:
    got = ranks[0]["bn_options"]
    assert got["splits"] == [1, 1, 4]  # 8 groups in the global batch: 4 per process on 2 processes
    assert got["splits_error"].startswith("model.bn_splits: 3 BN groups cannot be shared evenly by 2 processes")
    assert du.bn_splits_per_process(8) == 8  # one process: all of them


def test_sync_bn_converts_for_gpu_ranks_and_is_refused_on_cpu(ranks: list[dict[str, Any]]) -> None:
    got = ranks[0]["bn_options"]
    assert got["cpu_error"].startswith("model.sync_bn: PyTorch's SyncBatchNorm needs GPUs")
    assert got["sync_layers"] == 20 and got["untouched"] == 0  # every BN of the ResNet-18
    model = dist_worker.tiny_resnet()  # 1 process: the very same module back, its BN layers untouched
    kinds = [type(m) for m in model.modules()]
    assert du.convert_sync_bn(model, True, torch.device("cpu")) is model
    assert [type(m) for m in model.modules()] == kinds and torch.nn.SyncBatchNorm not in kinds
    with pytest.raises(ConfigError, match="model.sync_bn: SyncBatchNorm replaces split BN"):
        load_config(None, ["model.sync_bn=true"])
    with pytest.raises(ConfigError, match="train.dist_timeout_s"):
        load_config(None, ["train.dist_timeout_s=0"])


@pytest.mark.parametrize("name", list(METHODS))
def test_under_several_gpu_processes_bn_is_synced_where_the_method_declares_it(name: str) -> None:
    """The default is the method's: MoCo v3, SimCLR, BYOL and SwAV normalise over the global batch as
    their papers do, MoCo v1/v2 rely on shuffle BN; model.sync_bn set by hand wins either way."""
    declared = {"moco": False, "end_to_end": False, "memory_bank": False, "moco_v3": True, "simclr": True,
                "byol": True, "swav": True}[name]
    assert METHODS[name].sync_bn is declared
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    config = load_config(None, [f"model.method={name}", "model.bn_splits=1"])
    assert config.model.sync_bn is None
    assert sync_bn_choice(config, gpu, 8)[0] is declared
    assert sync_bn_choice(config, gpu, 1)[0] is False  # one process: plain BN sees the whole batch
    assert sync_bn_choice(config, cpu, 2) == (False, f"{name} asks for it, but SyncBatchNorm needs GPUs: BN per "
                                                       "process") if declared else not sync_bn_choice(config, cpu, 2)[0]
    split = load_config(None, [f"model.method={name}", "model.bn_splits=8"])
    assert sync_bn_choice(split, gpu, 8)[0] is declared and sync_bn_choice(split, gpu, 2)[0] is False  # split BN asked
    for value in (True, False):
        assert sync_bn_choice(load_config(None, [f"model.method={name}", "model.bn_splits=1",
                                                 f"model.sync_bn={str(value).lower()}"]), gpu, 8) == (value, "model.sync_bn as set")
    converted = build_method(config, 1, gpu, bank_size=8)  # one process here: nothing to convert, whatever the choice
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())


# --- data sharding (no process group needed) --------------------------------------------------------
def _dataset(n: int) -> TensorImageDataset:
    return TensorImageDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(),
                              torch.arange(n) % 3)


def test_sharded_in_memory_loader_gives_each_rank_its_slice_of_the_global_batch() -> None:
    data = _dataset(50)
    single = InMemoryLoader(data, 12, shuffle=True, drop_last=True, seed=4)
    shards = [InMemoryLoader(data, 6, shuffle=True, drop_last=True, seed=4, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 3):
        for loader in (single, *shards):
            loader.set_epoch(epoch)
        assert len(single) == len(shards[0]) == len(shards[1]) == 4
        for (_, _, whole), (_, _, a), (_, _, b) in zip(single, *shards):
            assert torch.equal(torch.cat([a, b]), whole)
    with pytest.raises(ValueError, match="drop_last=True"):
        InMemoryLoader(data, 6, shuffle=True, drop_last=False, num_replicas=2, rank=0)


def test_dataloader_path_uses_a_distributed_sampler_reshuffled_by_set_epoch() -> None:
    data = torch.utils.data.Subset(_dataset(40), list(range(40)))  # not in-memory: DataLoader path
    loaders = [make_loader(data, 5, shuffle=True, drop_last=True, seed=1, num_replicas=2, rank=r) for r in (0, 1)]

    def epoch_indices(loader: Any, epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return [i for _, _, idx in loader for i in idx.tolist()]

    first = [epoch_indices(loader, 0) for loader in loaders]
    assert len(first[0]) == len(first[1]) == 20 and set(first[0]).isdisjoint(first[1])
    assert epoch_indices(loaders[0], 1) != first[0] and epoch_indices(loaders[0], 0) == first[0]


def test_one_process_needs_no_process_group_and_a_bad_launch_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with du.process_group(torch.device("cpu"), timeout_s=5):
        assert not du.is_distributed() and du.world_size() == 1 and du.local_batch_size(6) == 6
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(du.DistributedFailure, match="WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set"):
        with du.process_group(torch.device("cpu"), timeout_s=5):
            pass


# --- failures and the command line ---------------------------------------------------------------
@needs_fashion_mnist
@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_dead_or_hung_rank_makes_the_other_exit_with_an_error_within_the_timeout(tmp_path: Path, how: str) -> None:
    timeout_s = 5
    run = tmp_path / "run"
    procs = start_ranks(["-m", "moco", "pretrain", "fmnist_v2", *TINY, "optim.epochs=100", "train.knn_every=0",
                         "train.test_knn=false", "train.log_every=1", f"train.dist_timeout_s={timeout_s}",
                         f"train.output_dir={run}"])
    rank0, rank1 = procs
    try:
        deadline = time.time() + 180
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert rank0.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        rank1.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        stopped = time.time()
        _, stderr = rank0.communicate(timeout=timeout_s + 30)
        waited = time.time() - stopped
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert rank0.returncode == 1, stderr[-3000:]
    assert "moco: error: rank 0 of 2: a collective failed, so another process died or did not answer within " \
           f"train.dist_timeout_s={timeout_s} s" in stderr
    assert "Traceback" not in stderr
    assert waited < timeout_s + 20
    if how == "hang":  # a silent peer is only noticed by the timeout
        assert waited >= timeout_s - 1


@needs_fashion_mnist
def test_torchrun_two_processes_write_one_run_directory_and_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "moco", "pretrain", "fmnist_v2", *TINY, "train.debug_sync_checks=true",
                               f"train.output_dir={run}", *extra], capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env=env)

    result = torchrun("optim.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1 and result.stdout.count("epoch 1/1") == 1
    assert json.loads((run / "resolved.json").read_text())["processes"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("epoch") == 1 and [r["kind"] for r in rows].count("test") == 1
    steps = 800 // 64  # the global batch of 64 is 32 per process: as many steps as one process
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert ckpt["step"] == steps and len(ckpt["rng_of_ranks"]) == 2
    assert not torch.equal(ckpt["rng_of_ranks"][0]["torch"], ckpt["rng_of_ranks"][1]["torch"])
    assert int(ckpt["model"]["queue_ptr"]) == steps * 64 % 256
    torch.testing.assert_close(ckpt["model"]["queue"].norm(dim=0), torch.ones(256))

    result = torchrun("optim.epochs=2", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    assert load_checkpoint(run / "checkpoint_last.pth")["step"] == 2 * steps
