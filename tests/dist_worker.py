"""One rank of the 2-process gloo checks in test_distributed.py.

Run as ``python -m tests.dist_worker OUT_DIR`` with torchrun's environment variables set (the
test starts both ranks itself). Each rank joins the group through ``moco.distributed``, runs
every scenario below and saves what it observed to ``OUT_DIR/rank<r>.pt``; the test compares
the ranks with each other and with single-process runs of the same steps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moco import MoCo
from moco import distributed as du
from moco.config import ConfigError, load_config
from moco.evaluate.knn import knn_accuracy
from moco.methods import METHODS, Batch, MoCoMethod, MoCoV3, SimCLR, StepContext
from moco.momentum import cosine_momentum, make_momentum_copy
from moco.step import apply_momentum, step_function
from tests.conftest import LinearEncoder, tiny_resnet

STEPS, GLOBAL_BATCH = 5, 8


def equivalence_inputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: the same on every rank and in the single-process run."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g)


def linear_moco() -> MoCo:
    torch.manual_seed(0)
    return MoCo(LinearEncoder(num_classes=8), dim=8, K=32, m=0.9, T=0.2)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=1e-4)


def my_slice(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0] // du.world_size()
    return x[du.rank() * n : (du.rank() + 1) * n]


def final_state(model: MoCo) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_style_ddp() -> dict[str, Any]:
    """The reference's pattern verbatim: DDP(MoCo(...)), forward(im_q, im_k), cross-entropy."""
    model = linear_moco()
    ddp = DistributedDataParallel(model)
    optimizer = sgd(ddp.parameters())
    losses = []
    for step in range(STEPS):
        im_q, im_k = equivalence_inputs(step)
        logits, labels = ddp(my_slice(im_q), my_slice(im_k))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(du.mean_over_ranks(loss.detach()).item())
    return {"losses": losses, "state": final_state(model)}


def local_views(step: int) -> list[torch.Tensor]:
    """Two extra query views of the global batch (multi-crop's path; same size for the linear encoder)."""
    g = torch.Generator().manual_seed(200 + step)
    return [torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g) for _ in range(2)]


def loop_step(method: Any, views: tuple[torch.Tensor, ...], indices: torch.Tensor | None = None) -> Any:
    """What the training loop does each step: the targets' momentum (m(t) = the method's m), then
    the method's step through ``step_function`` (DDP, no per-step buffer broadcast)."""
    if not hasattr(method, "_step_fn"):
        method._step_fn = step_function(method, torch.device("cpu"))
    ctx = StepContext(momentum=getattr(method, "m", 0.0))
    apply_momentum(method, ctx.momentum)
    return method._step_fn(Batch(views, indices), ctx)


def training_loop_step(symmetric: bool, with_local_views: bool = False) -> dict[str, Any]:
    """The training loop's path, which must equal the reference's (DDP of the facade) above."""
    torch.manual_seed(0)
    model = MoCoMethod(LinearEncoder(num_classes=8), dim=8, K=32, m=0.9, T=0.2, mlp=False, shuffle_bn=True,
                       symmetric=symmetric)
    optimizer = sgd(model.encoder_q.parameters())
    losses = []
    for step in range(STEPS):
        x1, x2 = equivalence_inputs(step)
        local = [my_slice(v) for v in local_views(step)] if with_local_views else []
        out = loop_step(model, (my_slice(x1), my_slice(x2), *local))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(du.mean_over_ranks(out.loss.detach()).item())
    return {"losses": losses, "state": final_state(model)}


def linear_moco_v3() -> Any:
    """MoCo v3 with BN-free projector and predictor (linear layers), so half batches on two
    processes must equal the whole batch on one: only the labels' rank offset and the keys'
    all-gather differ."""
    torch.manual_seed(0)
    model = MoCoV3(LinearEncoder(num_classes=8), dim=8, T=0.5)
    model.encoder_q.fc, model.predictor = nn.Linear(64, 8), nn.Linear(8, 8)
    model.encoder_k = make_momentum_copy(model.encoder_q)
    return model


def moco_v3_scenario(world: bool = True) -> dict[str, Any]:
    """MoCo v3 through the loop's path (cosine m(t), DDP); with ``world=False`` the same steps on
    one process with the whole batch."""
    model = linear_moco_v3()
    optimizer = sgd([*model.encoder_q.parameters(), *model.predictor.parameters()])
    step_fn = step_function(model, torch.device("cpu")) if world else model.training_step
    losses = []
    for step in range(STEPS):
        x1, x2 = equivalence_inputs(step)
        views = (my_slice(x1), my_slice(x2)) if world else (x1, x2)
        ctx = StepContext(step, STEPS, cosine_momentum(0.9, step, STEPS))
        apply_momentum(model, ctx.momentum)
        out = step_fn(Batch(views), ctx)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(du.mean_over_ranks(out.loss.detach()).item())
    return {"losses": losses, "state": final_state(model), "labels": out.labels.clone()}


def simclr_scenario(world: bool = True) -> dict[str, Any]:
    """SimCLR with a BN-free projector through the loop's path: negatives from the other rank arrive
    by an all-gather that carries gradients, so two half batches train like one whole batch."""
    torch.manual_seed(0)
    model = SimCLR(LinearEncoder(num_classes=8), dim=8, T=0.5)
    model.encoder_q.fc = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))
    optimizer = sgd(model.encoder_q.parameters())
    step_fn = step_function(model, torch.device("cpu")) if world else model.training_step
    losses, grads = [], []
    for step in range(STEPS):
        x1, x2 = equivalence_inputs(step)
        views = (my_slice(x1), my_slice(x2)) if world else (x1, x2)
        out = step_fn(Batch(views), StepContext(step, STEPS))
        optimizer.zero_grad()
        out.loss.backward()
        grads.append(model.encoder_q.fc[0].weight.grad.clone())
        optimizer.step()
        losses.append(du.mean_over_ranks(out.loss.detach()).item())
    return {"losses": losses, "grads": grads, "state": final_state(model)}


def shuffle_scenario() -> dict[str, Any]:
    """Sample ids through shuffle/unshuffle, and a BN layer encoding its shuffled slice."""
    ids = (du.rank() * 8 + torch.arange(8)).float().view(8, 1)
    torch.manual_seed(7 + du.rank())  # the ranks draw different permutations; rank 0's is used
    shuffled, idx_unshuffle = du.shuffle_batch(ids)
    restored = du.unshuffle_batch(shuffled, idx_unshuffle)

    torch.manual_seed(1)
    bn = nn.BatchNorm1d(3)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(20 + du.rank())) + 10.0 * du.rank()
    torch.manual_seed(11)
    seen: list[torch.Tensor] = []
    bn.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
    out = du.encode_with_shuffle_bn(bn, x)
    return {"ids": ids, "shuffled": shuffled, "idx_unshuffle": idx_unshuffle, "restored": restored,
            "bn_input": x, "bn_saw": seen[0], "bn_out": out, "bn_running_mean": bn.running_mean.clone()}


def queue_sync_scenario() -> dict[str, Any]:
    """A BN ResNet trained through the loop's path on different data per rank: queue, pointer and
    weights must stay identical, checked every step by the debug check; then one rank drifts."""
    torch.manual_seed(0)
    model = MoCoMethod(lambda num_classes: tiny_resnet(num_classes, bn_splits=2), dim=8, K=48, m=0.99, T=0.2, mlp=True,
                       shuffle_bn=True)
    optimizer = sgd(model.encoder_q.parameters())
    torch.manual_seed(1000 + du.rank())  # different images on each rank
    for _ in range(4):
        out = loop_step(model, (torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12)))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        du.assert_same_on_all_ranks({"queue": model.queue, "queue_ptr": model.queue_ptr,
                                     **dict(model.named_parameters())})
    result = {"queue": model.queue.clone(), "queue_ptr": model.queue_ptr.clone(),
              "encoder_k": {k: v.clone() for k, v in model.encoder_k.named_parameters()}}
    if du.rank() == 1:
        model.queue[0, 5] += 1e-3
    try:
        du.assert_same_on_all_ranks({"queue": model.queue, "queue_ptr": model.queue_ptr})
        result["drift_error"] = ""
    except du.ReplicasOutOfSync as err:
        result["drift_error"] = str(err)
    return result


def memory_bank_scenario() -> dict[str, Any]:
    """The memory bank through the loop's path: each rank refreshes its own images' entries and
    every rank applies both ranks' refreshes, so the banks stay one bank. End-to-end refuses."""
    from moco.methods import EndToEnd, MemoryBankContrast

    torch.manual_seed(0)
    model = MemoryBankContrast(LinearEncoder(num_classes=8), bank_size=20, dim=8, K=6, T=0.2)
    initial = model.bank.features.clone()
    optimizer = sgd(model.encoder_q.parameters())
    torch.manual_seed(2000 + du.rank())  # different images and negatives on each rank
    for step in range(3):  # rank r refreshes images 6*step + 3*r + (0, 1, 2): 0..17 in all
        indices = 6 * step + 3 * du.rank() + torch.arange(3)
        out = loop_step(model, (torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)), indices)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    try:
        EndToEnd(LinearEncoder(num_classes=8), dim=8).check_batch_size(4)
        e2e_error = ""
    except ValueError as err:
        e2e_error = str(err)
    return {"initial": initial, "bank": model.bank.features.clone(), "e2e_error": e2e_error}


def knn_scenario() -> dict[str, Any]:
    """kNN from sharded feature extraction: gathered bank, accuracies averaged by shard size."""
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(51, 8, generator=g), dim=1)
    bank_y = torch.randint(0, 4, (51,), generator=g)
    queries = F.normalize(torch.randn(23, 8, generator=g), dim=1)
    query_y = torch.randint(0, 4, (23,), generator=g)
    mine = torch.arange(du.rank(), 51, du.world_size())
    gathered_bank, gathered_y = du.gather_uneven(bank[mine]), du.gather_uneven(bank_y[mine])
    q = torch.arange(du.rank(), 23, du.world_size())
    accuracy = knn_accuracy(gathered_bank, gathered_y, queries[q], query_y[q], k=5, temperature=0.1, num_classes=4)
    return {"accuracy": du.weighted_mean_over_ranks(accuracy, len(q)), "bank_rows": len(gathered_bank),
            "objects": du.all_gather_objects({"rank": du.rank(), "t": torch.full((2,), float(du.rank()))})}


def bn_options_scenario() -> dict[str, Any]:
    """SyncBN conversion and how split BN's groups are shared out among processes."""
    try:
        du.convert_sync_bn(tiny_resnet(), True, torch.device("cpu"))
        cpu_error = ""
    except ConfigError as err:
        cpu_error = str(err)
    try:
        du.bn_splits_per_process(3)
        splits_error = ""
    except ConfigError as err:
        splits_error = str(err)
    converted = du.convert_sync_bn(tiny_resnet(), True, torch.device("cuda", 0))  # module surgery only
    return {"cpu_error": cpu_error, "splits": [du.bn_splits_per_process(n) for n in (1, 2, 8)],
            "splits_error": splits_error,
            "sync_layers": sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()),
            "untouched": sum(isinstance(m, nn.SyncBatchNorm) for m in du.convert_sync_bn(tiny_resnet(), False,
                                                                                       torch.device("cuda", 0)).modules())}


# Every registered method but end-to-end (one process only: its negatives are the batch on one device).
SEVERAL_PROCESS_METHODS = [name for name in METHODS if name != "end_to_end"]


def without_batch_norm(module: nn.Module) -> nn.Module:
    """Every BN layer replaced by the identity: per-process BN statistics are the one thing that
    may legitimately differ between half batches and the whole batch."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            without_batch_norm(child)
    return module


def small_method(name: str) -> Any:
    """``name`` on a linear encoder with small BN-free heads, built as the loop builds it."""
    overrides = [f"model.method={name}", "model.dim=8", "model.K=32", "model.T=0.5", "model.bn_splits=1",
                 f"optim.batch_size={GLOBAL_BATCH}"]
    overrides += {"moco_v3": ["moco_v3.mlp_dim=16"], "byol": ["byol.mlp_dim=16"], "simclr": ["simclr.mlp_dim=16"],
                  "swav": ["swav.mlp_dim=16", "swav.prototypes=10", "swav.freeze_prototypes_epochs=0"]}.get(name, [])
    config = load_config(None, overrides)
    torch.manual_seed(0)
    method = METHODS[name].build(config, lambda num_classes: LinearEncoder(num_classes=num_classes),
                                 bank_size=GLOBAL_BATCH * STEPS)
    return without_batch_norm(method)


def rank_dependent_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two views of a global batch whose halves (rank 0's, rank 1's) differ in scale and offset,
    so per-rank statistics (a rank's largest score, say) differ too; and the images' indices."""
    g = torch.Generator().manual_seed(300 + step)
    scale = torch.tensor([1.0] * (GLOBAL_BATCH // 2) + [3.0] * (GLOBAL_BATCH // 2)).view(-1, 1, 1, 1)
    views = [torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g) * scale + (scale - 1) for _ in range(2)]
    return views[0], views[1], GLOBAL_BATCH * step + torch.arange(GLOBAL_BATCH)


def every_method_scenario(name: str, world: bool = True) -> dict[str, Any]:
    """Two steps of method ``name`` through the loop's path (momentum, DDP when ``world``, SGD) on
    :func:`rank_dependent_batch`; with ``world=False`` the whole batch on one process. Returns the
    global losses, the (DDP-averaged) gradients of every step and the final state."""
    method = small_method(name)
    optimizer = sgd([p for group in method.parameter_groups(0.0) for p in group["params"]])
    step_fn = step_function(method, torch.device("cpu")) if world else method.training_step
    losses, grads = [], []
    for step in range(2):
        x1, x2, indices = rank_dependent_batch(step)
        views, indices = ((my_slice(x1), my_slice(x2)), my_slice(indices)) if world else ((x1, x2), indices)
        ctx = StepContext(step, 2, momentum=0.9)
        apply_momentum(method, ctx.momentum)
        torch.manual_seed(400 + step)  # the same draws (sampled negatives, shuffles) on every rank and alone
        out = step_fn(Batch(views, indices), ctx)
        optimizer.zero_grad()
        out.loss.backward()
        grads.append({k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None})
        optimizer.step()
        losses.append(du.mean_over_ranks(out.loss.detach()).item())
    return {"losses": losses, "grads": grads, "state": {k: v.clone() for k, v in method.state_dict().items()}}


def folder_scan_scenario(root: Path) -> dict[str, Any]:
    """Both ranks open the same image folder: how many headers each one read."""
    from moco.data import datasets

    opened, real = [], datasets.inspect
    datasets.inspect = lambda path: opened.append(path) or real(path)
    try:
        folder = datasets.ImageFolderDataset(root, load_size=8, channels=1)
    finally:
        datasets.inspect = real
    return {"headers_read": len(opened), "images": len(folder), "labels": folder.labels.clone()}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    with du.process_group(torch.device("cpu"), timeout_s=60):
        assert du.world_size() == 2, "run with WORLD_SIZE=2"
        results = {
            "reference_ddp": reference_style_ddp(),
            "training_step_symmetric": training_loop_step(symmetric=True),
            "training_step_local_views": training_loop_step(symmetric=False, with_local_views=True),
            "shuffle": shuffle_scenario(),
            "queue_sync": queue_sync_scenario(),
            "knn": knn_scenario(),
            "memory_bank": memory_bank_scenario(),
            "moco_v3": moco_v3_scenario(),
            "simclr": simclr_scenario(),
            "bn_options": bn_options_scenario(),
            "every_method": {name: every_method_scenario(name) for name in SEVERAL_PROCESS_METHODS},
            "folder_scan": folder_scan_scenario(Path(out_dir) / "images" / "train"),
        }
        torch.save(results, Path(out_dir) / f"rank{du.rank()}.pt")
    assert not du.is_distributed(), "the process group is destroyed on the way out"


if __name__ == "__main__":
    main(sys.argv[1])
