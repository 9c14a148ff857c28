"""What a self-supervised method is to the one training loop (:mod:`moco.train`).

A method is an ``nn.Module`` that owns its networks and its dictionary and says, in one place,
everything the loop must know about it:

- ``name`` (what ``model.method`` selects), ``label`` (for tables) and ``Options``: its own config
  section, a dataclass read from the top-level section of that name (typed, unknown keys rejected);
- ``sync_bn``: whether its BN layers normalise over the global batch under several GPU processes;
- ``build(config, encoder_factory, bank_size)`` and ``check_config(config)``;
- ``encoder`` (the online encoder, head included), ``backbone`` and ``projector`` (what evaluation
  and export use);
- ``view_augmentations``: one augmentation per view;
- ``encoder_passes(config)``: the encoder work a training image costs a step, in forward passes
  (:data:`TRAINED_VIEW` 3, :data:`TARGET_VIEW` 1, :func:`local_view_passes` for multi-crop); the
  ``folder`` preset's derived epochs divide by it over MoCo v2's 4, and a test counts it;
- ``parameter_groups``: what the optimiser trains, with the weight-decay exclusions;
- ``momentum_pairs``: (target, online) modules; the loop owns the schedule m(t) and applies
  θ_target ← m·θ_target + (1−m)·θ_online before each step;
- ``replicated_state``: buffers every process must hold identically (queue, bank);
- ``training_step(batch, ctx) -> StepOutput``: the loss, plus what the monitors read.

Nothing here calls ``.cuda()`` or ``torch.distributed``: the loop moves the module and wraps the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from moco.builder import MoCoOutput
from moco.diagnostics import chance_loss
from moco.models.heads import describe_head
from moco.models.resnet import backbone_features

if TYPE_CHECKING:
    from moco.config import Config
    from moco.data.augment import AugmentSpec

EncoderFactory = Callable[..., nn.Module]

# Encoder work in forward passes of one view: a view that is trained costs its forward and a
# backward of about twice the forward; a momentum target's view costs its forward alone.
TRAINED_VIEW, TARGET_VIEW = 3.0, 1.0


# One training step's result: the loss, the logits and labels behind it (pretext accuracy, chance
# loss), the detached queries (collapse statistics) and further metrics. Defined beside the
# reference-compatible MoCo, whose ``contrastive_loss`` returns it.
StepOutput = MoCoOutput


@dataclass
class Batch:
    """The views of one batch of images (the global views first, then the small local views)
    and the images' dataset indices (the memory bank's keys)."""

    views: tuple[torch.Tensor, ...]
    indices: torch.Tensor | None = None

    @property
    def global_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two full-size views of each image."""
        return self.views[0], self.views[1]

    @property
    def local_views(self) -> tuple[torch.Tensor, ...]:
        """Multi-crop's small views (``aug.local_crops`` of them), empty without multi-crop."""
        return tuple(self.views[2:])


@dataclass(frozen=True)
class StepContext:
    """Where the loop is when it calls ``training_step``; ``momentum`` is the m(t) it has just applied."""

    step: int = 0
    total_steps: int = 1
    momentum: float = 0.0
    epoch: int = 0


@dataclass(frozen=True)
class Traits:
    """What a method uses, as the seeds' comparison tables list it."""

    negatives: str      # where the negatives come from: "queue", "batch", "memory bank", "none"
    momentum_encoder: bool
    predictor: bool = False


@dataclass
class NoOptions:
    """A method without options of its own."""


class Method(nn.Module):
    """Base class of the methods in :mod:`moco.methods`; see the module docstring."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    traits: ClassVar[Traits]
    supports_local_views: ClassVar[bool] = False  # multi-crop's small views (aug.local_crops)
    uses_model_k: ClassVar[bool] = False  # draws K negatives from a queue or bank: model.K means something
    # Under several GPU processes, BN over the global batch (SyncBatchNorm) as the method's paper
    # trains it; ``model.sync_bn`` overrides (see :func:`moco.methods.sync_bn_choice`).
    sync_bn: ClassVar[bool] = False
    # What the collapse warning suggests for this method, beyond lr, batch / BN groups and augmentation.
    collapse_advice: ClassVar[tuple[str, ...]] = ()

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: "Config", encoder_factory: EncoderFactory, bank_size: int = 0) -> "Method":
        """The method for ``config``, its networks made by ``encoder_factory(num_classes)`` (the
        backbone the ``model`` section describes); ``bank_size``: the image indices a memory bank holds."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, config: "Config") -> None:
        """Checks across options that only this method needs; raise ``ConfigError`` naming the option."""

    @classmethod
    def encoder_passes(cls, config: "Config") -> float:
        """The encoder work one training image costs a step, in forward passes of one global view
        (:data:`TRAINED_VIEW`, :data:`TARGET_VIEW`); MoCo v1/v2's query and key make 4. The
        ``folder`` preset divides its derived epochs by it against MoCo v2's, so every method gets
        about the same time within the 20-800 epoch bounds; ``moco bench --cases moco,NAME``
        measures it (docs/benchmarks.md)."""
        raise NotImplementedError(f"{cls.__name__} does not declare encoder_passes")

    @classmethod
    def options_of(cls, config: "Config") -> Any:
        """This method's own config section."""
        return config.methods.get(cls.name) or cls.Options()

    # --- what evaluation and export use --------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module:
        """The online encoder with its projector as ``fc`` (torchvision key names)."""
        return self.encoder_q

    @property
    def projector(self) -> nn.Module:
        """The head on the backbone (the encoder's ``fc``): what evaluation strips and export leaves out."""
        return self.encoder.fc

    def head_spec(self) -> dict[str, Any]:
        """How the projector in ``encoder.fc`` is built (read off its weights), for the backbone
        spec that checkpoints store."""
        return describe_head(self.encoder.state_dict())

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (the encoder without its projector), no gradient."""
        return backbone_features(self.encoder, images)

    # --- what the loop needs -----------------------------------------------------------------------------
    def view_augmentations(self, spec: "AugmentSpec", local_spec: "AugmentSpec | None",
                           local_crops: int) -> list["AugmentSpec"]:
        """One augmentation per view: two global views of ``spec``, then the local views."""
        return [spec, spec] + ([local_spec] * local_crops if local_spec is not None else [])

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """What the optimiser trains. MoCo v1/v2 decay every parameter, as the reference does."""
        return [{"params": [p for p in self.encoder.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(target, online) pairs the loop moves by θ_target ← m·θ_target + (1−m)·θ_online."""
        return []

    def replicated_state(self) -> dict[str, torch.Tensor]:
        """Buffers that every process keeps identical without a broadcast (checked by
        ``train.debug_sync_checks``)."""
        return {}

    def check_batch_size(self, local_batch: int) -> None:
        """Raise ``ValueError`` if this per-process batch cannot work."""

    def dictionary_warmup_steps(self, steps_per_epoch: int, batch_size: int) -> int:
        """Steps until every negative is a real key (the collapse monitor waits that long);
        ``batch_size`` is the global batch."""
        return 0

    def chance_loss(self, num_logits: int) -> float:
        """The loss when every logit ties (the collapse monitor's "back at chance")."""
        return chance_loss(num_logits, 2 if getattr(self, "symmetric", False) else 1)

    def collapse_settings(self, images: int) -> list[str]:
        """This method's options that the collapse advice names, with their values (``images``:
        how many the run pretrains on)."""
        return []

    def training_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """One step's loss on ``batch``, with the logits, labels and queries the monitors read; the
        loop has already applied the momentum update and does the backward and the optimiser step."""
        raise NotImplementedError


def local_view_passes(config: "Config") -> float:
    """Multi-crop's small views, each trained, at their share of a global view's pixels."""
    return TRAINED_VIEW * config.aug.local_crops * (config.local_view_size() / config.data.image_size) ** 2


def same_views(views: Sequence[Any]) -> list[int]:
    """Index of the first equal entry for each view, so equal augmentations share one module."""
    return [next(j for j in range(i + 1) if views[j] == views[i]) for i in range(len(views))]
