"""What a run would train, before it trains: ``moco pretrain CONFIG [overrides] --print-config``.

A config says ``auto`` for options that depend on the data or the machine, and a run decides them
when it starts. This module makes the same decisions with the same functions (``moco.derive`` for
the data, ``moco.runtime`` for device and precision, ``moco.methods.sync_bn_choice``), but reads
only what they need (image headers, dataset sizes), so a user can check the plan, and why each
value is what it is, in seconds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import yaml

from moco.config import Config, auto_options, is_auto


@dataclass(frozen=True)
class Decision:
    """One value a run decides for itself, and the reason."""

    option: str
    value: str
    why: str

    def line(self) -> str:
        """``option=value (why)``, as a run prints what it derived."""
        return f"{self.option}={self.value} ({self.why})"


def _data_decisions(config: Config) -> list[Decision]:
    """The ``auto`` options, derived from the data as a run derives them (the config is updated)."""
    from moco.data.splits import build_data
    from moco.runtime import resolve_device

    if not auto_options(config):
        return []
    probe = copy.deepcopy(config)
    probe.data.in_memory_mb = 0  # headers only: nothing is decoded to print the plan
    data = build_data(probe, resolve_device(config.train.device), pretraining=False)
    in_memory_mb, epochs = config.data.in_memory_mb, config.optim.epochs
    for section in ("model", "data", "aug", "optim", "train"):
        setattr(config, section, getattr(probe, section))
    config.data.in_memory_mb = in_memory_mb
    decisions = []
    for note in data.derived:
        option, rest = note.split("=", 1)
        value, why = rest.split(" (", 1)
        decisions.append(Decision(option, value, why.removesuffix(")")))
    if config.train.budget and is_auto(epochs):  # only the run itself can time its step (a stand-in until then)
        decisions.append(Decision("optim.epochs", "auto", f"sized when the run starts: it times its own step and "
                                                          f"fits its epochs into train.budget={config.train.budget}"))
    return decisions


def _machine_decisions(config: Config) -> list[Decision]:
    """Device, precision, threads, the lr at this batch and SyncBN: what the machine and the batch decide."""
    import torch

    from moco.methods import sync_bn_choice
    from moco.runtime import resolve_device, resolve_precision

    t, o = config.train, config.optim
    device = resolve_device(t.device)
    decisions = []
    if t.device == "auto":
        decisions.append(Decision("train.device", str(device), "a GPU is available" if device.type == "cuda"
                                  else "no GPU is available"))
    precision = resolve_precision(t.precision, device)
    if t.precision == "auto":
        why = {"cuda": "bf16 autocast on a GPU that has it, else fp16 with a gradient scaler",
               "cpu": "bf16 only where oneDNN reports native bf16; elsewhere bf16 is slower than fp32"}[device.type]
        decisions.append(Decision("train.precision", precision, why))
    if not t.threads and device.type == "cpu":
        decisions.append(Decision("train.threads", str(torch.get_num_threads()), "0: all cores"))
    lr = o.lr * o.batch_size / o.base_batch_size
    decisions.append(Decision("effective lr", f"{lr:.4g}", f"optim.lr {o.lr:g} x optim.batch_size "
                                                                f"{o.batch_size} / optim.base_batch_size {o.base_batch_size}"))
    if config.model.sync_bn is None:
        sync_bn, why = sync_bn_choice(config, device, processes=1)
        decisions.append(Decision("model.sync_bn", str(sync_bn).lower(), why + "; under torchrun the method decides"))
    return decisions


def resolve(config: Config) -> tuple[Config, list[Decision]]:
    """A copy of ``config`` with every ``auto`` derived, and each decision a run would make with its reason."""
    from moco.derive import finish

    resolved = copy.deepcopy(config)
    decisions = _data_decisions(resolved)
    finish(resolved)
    return resolved, decisions + _machine_decisions(resolved)


def describe_plan(config: Config) -> str:
    """The resolved config as YAML, then the decisions: what ``--print-config`` prints."""
    resolved, decisions = resolve(config)
    values = resolved.to_dict()
    if any(d.option == "optim.epochs" and d.value == "auto" for d in decisions):
        values["optim"]["epochs"] = "auto"  # sized by train.budget when the run starts
    lines = [yaml.safe_dump(values, sort_keys=False).rstrip(), "",
             "# decided for this run (set any of them to override):"]
    lines += [f"#   {decision.line()}" for decision in decisions]
    return "\n".join(lines) + "\n"
