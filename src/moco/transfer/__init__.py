"""Transfer: fine-tune a pretrained ResNet inside a detector or a segmenter, beside supervised and
random starts, as the MoCo paper's transfer experiments do (``moco transfer <task>``).

Each task is one module listed in :data:`TASKS`. A task module defines

- ``HELP`` (one line) and ``DESCRIPTION`` (a paragraph) for ``moco transfer <task> --help``;
- ``add_arguments(parser)``: its options (the shared ones come from
  :func:`moco.transfer.common.add_transfer_arguments`);
- ``main(args) -> int``: runs it from the parsed arguments.

What the tasks share (backbones, the schedule, resumable rows, result tables) lives in
:mod:`moco.transfer.common`.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from moco.transfer.common import INITS, TransferOptions, backbone_for, convert_bn_for, resnet_stages

# task name -> the module that implements it
TASKS: dict[str, str] = {
    "detect": "moco.transfer.detect",
    "segment": "moco.transfer.segment",
    "scenes": "moco.transfer.scenes",    # writes the scene set the tasks can be measured on
    "supervised": "moco.transfer.supervised",  # trains the supervised start of the comparison
}

__all__ = ["INITS", "TASKS", "TransferOptions", "add_commands", "backbone_for", "convert_bn_for", "resnet_stages",
           "task_module"]


def task_module(name: str) -> ModuleType:
    """The module implementing transfer task ``name``."""
    return importlib.import_module(TASKS[name])


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``moco transfer <task>`` for every task of :data:`TASKS`."""
    parser = sub.add_parser("transfer", help="fine-tune the pretrained backbone in a detector or segmenter, "
                                             "beside supervised and random starts",
                            description="Fine-tune the whole pretrained ResNet, BN included, inside a downstream "
                                        "model, with the same schedule for the checkpoint's weights, a supervised "
                                        "backbone and a random init; mean and std over seeds.")
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK", help="the downstream task")
    for name in TASKS:
        module = task_module(name)
        p = tasks.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.add_arguments(p)
        p.set_defaults(func=module.main)
