"""The online linear probe (``train.online_probe``): a linear classifier trained during pretraining
on the backbone features the step already computes, as solo-learn and lightly run it.

Each step the query view's pooled backbone features (the input of the encoder's ``fc`` head, in
the step's own forward) are taken, detached, and one step of the probe's own optimiser (AdamW,
``train.online_probe_lr``) fits a linear layer to the batch's labels. Images without a label
(-1) do not count. At each epoch's end the probe classifies the validation split, encoded with the
backbone in eval mode: ``online_probe_acc`` in the epoch row, beside the training accuracy and loss
of the probe over the epoch's steps.

The probe never touches the encoder's gradients, its optimiser or any random stream: a run with
the probe trains bit-for-bit as one without it. Its weights, optimiser and running sums are saved
in every checkpoint, so a resume continues it exactly.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moco import distributed as dist_utils
from moco.checkpoint import preserved_rng
from moco.config import Config, ConfigError
from moco.data.augment import EvalTransform
from moco.data.datasets import labels_of, make_loader
from moco.data.splits import Data
from moco.evaluate.knn import extract_features
from moco.models.resnet import feature_dim
from moco.run_log import read_metrics
from moco.runtime import say

__all__ = ["OnlineProbe", "build_online_probe", "probe_checkpoint", "probe_epoch_fields", "probe_step",
           "probe_summary", "probe_text", "restore_probe"]

CHECKPOINT_KEY = "online_probe"
EVAL_BATCH = 512


class OnlineProbe:
    """A linear layer on the online encoder's detached backbone features, with its own optimiser.

    ``attach`` hooks the input of the encoder's ``fc`` head (the pooled features); inside
    :meth:`step` the first call of the head, the step's query view, is kept. A head that sees
    several views at once (SwAV's concatenated views) gives the first ``len(labels)`` rows, which
    are the query view's.
    """

    def __init__(self, width: int, num_classes: int, lr: float, device: torch.device) -> None:
        # A convex problem: a zero start needs no random numbers (skip_init leaves nn.Linear's
        # random init out), so the run's generators draw what they would without the probe.
        self.classifier = nn.utils.skip_init(nn.Linear, width, num_classes, device=device)
        with torch.no_grad():
            self.classifier.weight.zero_()
            self.classifier.bias.zero_()
        # Fused: its step count stays on the device, so a step reads nothing back to the host.
        self.optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=lr, weight_decay=0.0,
                                           fused=device.type in ("cpu", "cuda"))
        # The epoch's sums over the steps, on the device until the epoch's end reads them:
        # cross-entropy summed over labelled images, correct predictions, labelled images.
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)
        self._armed = False
        self._features: torch.Tensor | None = None

    # --- taking the step's features ----------------------------------------------------------------
    def attach(self, encoder: nn.Module) -> None:
        """Keep the backbone features of ``encoder``'s next forward while :meth:`step` is open.

        The hooks are plain functions, so a ``deepcopy`` of the encoder (the budget's timed probe)
        shares them and, never armed, is left alone."""
        head = getattr(encoder, "fc", None)
        if head is None:  # the whole module is the backbone
            encoder.register_forward_hook(lambda _module, _args, output: self._keep(output))
        else:
            head.register_forward_pre_hook(lambda _module, args: self._keep(args[0]))

    def _keep(self, features: torch.Tensor) -> None:
        if self._armed:
            self._features, self._armed = features.detach(), False

    @contextmanager
    def step(self, labels: torch.Tensor) -> Iterator[None]:
        """Around one training step: keep its query view's features, then learn from them."""
        self._armed, self._features = True, None
        try:
            yield
        finally:
            self._armed = False
        features, self._features = self._features, None
        if features is not None:
            self.learn(features, labels)

    # --- learning ----------------------------------------------------------------------------------------
    def learn(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One optimiser step on ``features`` (detached here: no gradient reaches the encoder).

        Rows without a label or with a non-finite feature count for nothing. Under several processes
        the gradients are summed over ranks with the epoch's sums, in one all-reduce, and divided by
        the labelled images of the global batch. Nothing is read back to the host."""
        x = features.detach()[: labels.shape[0]].float().flatten(1)
        y = labels.to(x.device, non_blocking=True)
        usable = (y >= 0) & torch.isfinite(x).all(dim=1)
        x = x.masked_fill(~usable[:, None], 0.0)
        logits = self.classifier(x)
        losses = F.cross_entropy(logits, y.clamp(min=0), reduction="none") * usable
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        correct = ((logits.argmax(dim=1) == y) & usable).sum()
        sums = torch.stack([losses.sum().detach().double(), correct.double(), usable.sum().double()])
        grads = [p.grad for p in self.classifier.parameters()]
        flat = dist_utils.all_reduce_sum(torch.cat([sums, *(g.double().flatten() for g in grads)]))
        labelled = flat[2].clamp(min=1.0)
        offset = 3
        for g in grads:
            g.copy_((flat[offset:offset + g.numel()] / labelled).view_as(g))
            offset += g.numel()
        self.totals += flat[:3]
        self.optimizer.step()

    def epoch_train_fields(self) -> dict[str, float | None]:
        """The epoch's training loss and accuracy of the probe (one read), and a fresh start for the next."""
        loss_sum, correct, labelled = self.totals.tolist()
        self.totals.zero_()
        if not labelled:
            return {"online_probe_train_acc": None, "online_probe_train_loss": None}
        return {"online_probe_train_acc": 100.0 * correct / labelled, "online_probe_train_loss": loss_sum / labelled}

    # --- evaluating ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, encoder: nn.Module, dataset: Any, data: Data, config: Config, device: torch.device,
                 memory_format: torch.memory_format) -> float:
        """Top-1 (%) on ``dataset``, its backbone features computed in eval mode (BN running
        statistics, rank 0's under several processes, each rank encoding its shard). Leaves every
        RNG as it found it."""
        preprocess = EvalTransform(config.data.image_size, data.mean, data.std)
        dist_utils.broadcast_buffers(encoder)
        with preserved_rng():
            loader = make_loader(dist_utils.shard(dataset), EVAL_BATCH, shuffle=False, drop_last=False,
                                 workers=config.data.workers)
            features, labels = extract_features(encoder, loader, preprocess, device, memory_format=memory_format,
                                                normalize=False, on_device=True)
        predictions = self.classifier(features).argmax(dim=1).cpu()
        top1 = 100.0 * float((predictions == labels).float().mean()) if len(labels) else 0.0
        return dist_utils.weighted_mean_over_ranks(top1, len(labels))

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"classifier": self.classifier.state_dict(), "optimizer": self.optimizer.state_dict(),
                "totals": self.totals.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.totals.copy_(state["totals"])


# --- what the training loop calls ------------------------------------------------------------------------
def build_online_probe(config: Config, data: Data, encoder: nn.Module, device: torch.device) -> OnlineProbe | None:
    """The probe ``train.online_probe`` asks for, attached to the online ``encoder``; None when off.

    It needs labels on the pretraining images and a labelled validation split: anything else is a
    ``ConfigError`` that says what to change."""
    t, d = config.train, config.data
    if not t.online_probe:
        return None
    if data.val is None or not data.num_classes:
        why = ("data.val_size=0 holds no validation images out" if data.num_classes
               else f"data.dataset={d.dataset} at {d.root or 'its default place'} has no labels")
        raise ConfigError(f"train.online_probe: needs a labelled validation split to score on, but {why}; "
                          f"set train.online_probe=false (the kNN monitor needs the same)")
    if not bool((labels_of(data.pretrain) >= 0).any()):
        raise ConfigError(f"train.online_probe: the pretraining images (data.train_split={d.train_split}) carry no "
                          f"labels to train it on; set train.online_probe=false or pretrain on a labelled split")
    probe = OnlineProbe(feature_dim(encoder), data.num_classes, t.online_probe_lr, device)
    probe.attach(encoder)
    return probe


def probe_step(probe: OnlineProbe | None, labels: torch.Tensor) -> ContextManager[None]:
    """Around a training step: the probe learns from it (nothing without a probe)."""
    return probe.step(labels) if probe is not None else nullcontext()


def probe_epoch_fields(probe: OnlineProbe | None, encoder: nn.Module, data: Data, config: Config,
                       device: torch.device, memory_format: torch.memory_format) -> dict[str, float | None]:
    """The epoch row's probe fields: validation top-1, and the epoch's training accuracy and loss."""
    if probe is None:
        return {}
    train = probe.epoch_train_fields()
    return {"online_probe_acc": probe.evaluate(encoder, data.val, data, config, device, memory_format), **train}


def probe_text(row: dict[str, Any]) -> str:
    """The epoch line's part: ``, online probe 81.20% (train 79.50%)``."""
    if "online_probe_acc" not in row:
        return ""
    train = row.get("online_probe_train_acc")
    return f", online probe {row['online_probe_acc']:.2f}%" + (f" (train {train:.2f}%)" if train is not None else "")


def probe_checkpoint(probe: OnlineProbe | None) -> dict[str, Any]:
    """What a checkpoint adds for the probe."""
    return {CHECKPOINT_KEY: probe.state_dict()} if probe is not None else {}


def restore_probe(probe: OnlineProbe | None, ckpt: dict[str, Any], path: Path) -> None:
    """Continue the probe from ``ckpt``; a checkpoint written without it starts it untrained, and says so."""
    if probe is None:
        return
    if CHECKPOINT_KEY not in ckpt:
        say(f"train.online_probe: {path} holds no online probe; it starts untrained at step {ckpt['step']}")
        return
    try:
        probe.load_state_dict(ckpt[CHECKPOINT_KEY])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"--resume: the online probe in {path} does not fit this run's ({err})") from None


def probe_summary(run_dir: Path) -> dict[str, Any]:
    """``summary.json``'s ``online_probe_acc``: validation top-1 per epoch, resumed epochs included."""
    scores = {row["epoch"]: row["online_probe_acc"] for row in read_metrics(run_dir)
              if row.get("kind") == "epoch" and "online_probe_acc" in row}
    return {"online_probe_acc": scores} if scores else {}
