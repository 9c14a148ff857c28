"""The method seam: one registry, every method trains and resumes exactly through the one loop,
checkpoints carry the backbone's spec, and the modules import without cycles."""

from __future__ import annotations

import ast
import copy
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from moco import ablate
from moco.checkpoint import load_checkpoint, save_atomic
from moco.config import CHOICES, ConfigError, load_config
from moco.data.augment import AugmentSpec
from moco.data.splits import build_data
from moco.methods import METHODS, Batch, Method, StepContext, build_method
from moco.pretrained import CheckpointFormatError, load_pretrained
from moco.schedule import momentum_at
from moco.train import pretrain, read_metrics, view_augmentations
from tests.eval_helpers import TINY_MODEL, save_tiny_moco_checkpoint
from tests.tiny import assert_identical_runs, run_moco, tiny_config

SRC = Path(__file__).resolve().parents[1] / "src" / "moco"


def test_the_registry_is_what_config_and_ablations_offer() -> None:
    assert CHOICES["model.method"] == tuple(METHODS) == ("moco", "end_to_end", "memory_bank", "moco_v3", "simclr",
                                                         "byol", "swav")
    assert set(ablate.METHOD_LABELS) == set(METHODS)
    for name, method in METHODS.items():
        assert method.name == name and method.label and method.traits.negatives
    with pytest.raises(ConfigError, match="model.method: .dino. is not one of moco, end_to_end, memory_bank, moco_v3, simclr, byol, swav"):
        load_config(None, ["model.method=dino"])


def test_a_method_section_is_typed_and_written_back(tmp_path: Path) -> None:
    config = load_config(None, ["model.method=memory_bank", "memory_bank.momentum=0.25"])
    assert config.method_options().momentum == 0.25 and config.to_dict()["memory_bank"]["momentum"] == 0.25
    with pytest.raises(ConfigError, match="memory_bank.momentum: expected a number"):
        load_config(None, ["model.method=memory_bank", "memory_bank.momentum=fast"])
    assert "moco" not in load_config(None, []).to_dict()  # a method without options adds no empty section


def _fixed_batch(name: str) -> tuple[Method, Batch]:
    torch.manual_seed(0)
    config = load_config(None, TINY_MODEL + [f"model.method={name}", "data.image_size=16"])
    method = build_method(config, channels=1, bank_size=64)
    images = torch.rand(16, 1, 16, 16)
    noisy = (images + 0.05 * torch.randn_like(images)).clamp(0, 1)
    return method, Batch((images, noisy), torch.arange(16))


def _loss_from(method: Method, state: Method, batch: Batch) -> float:
    """The loss of ``method``'s weights with ``state``'s dictionary, at a fixed RNG state."""
    probe = copy.deepcopy(method)
    for name, buffer in probe.replicated_state().items():
        buffer.copy_(state.replicated_state()[name])
    torch.manual_seed(1)
    with torch.no_grad():
        return probe.training_step(batch, StepContext()).loss.item()


@pytest.mark.parametrize("name", list(METHODS))
def test_a_step_lowers_the_loss_on_a_fixed_batch(name: str) -> None:
    method, batch = _fixed_batch(name)
    before = copy.deepcopy(method)
    groups = method.parameter_groups(0.0)
    trained = {id(p) for g in groups for p in g["params"]}
    assert {id(p) for p in method.encoder.parameters()} <= trained  # the online encoder is trained...
    assert not trained & {id(p) for target, _ in method.momentum_pairs() for p in target.parameters()}  # ...no target
    optimizer = torch.optim.SGD(groups, lr=0.05)
    torch.manual_seed(1)
    out = method.training_step(batch, StepContext())
    assert out.queries is not None  # the collapse monitor's input
    scored = out.logits is not None or out.logit_stats is not None
    assert scored == (name != "byol")  # logits (or their statistics) where there is a pretext task to score
    out.loss.backward()
    optimizer.step()
    assert _loss_from(method, before, batch) < _loss_from(before, before, batch) - 1e-3


def _logits_from_outputs(name: str, method: Method, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the step reported, the same numbers as fp32 products of the step's own fp32 queries and
    positives): the logits, or for the methods that never form them the mean positive logit."""
    q, k, n = out.queries, out.positives, out.queries.shape[0]
    if name in ("moco", "memory_bank"):
        return out.logit_stats[1], (q * k).sum(dim=1).mean() / method.T
    if name == "end_to_end":
        return out.logits[:, 0], (q * k).sum(dim=1) / method.T
    if name == "moco_v3":
        return out.logits[:n], q @ k.T / method.T
    if name == "simclr":
        return out.logits[:n, n:2 * n], q @ k.T / method.T
    if name == "swav":
        return out.logits, k @ method.prototypes.weight.T / method.T
    raise AssertionError(f"{name}: say which of its products feed a softmax")


@pytest.mark.parametrize("name", list(METHODS))
def test_products_that_feed_a_softmax_are_fp32_under_bf16_autocast(name: str) -> None:
    """The encoders run in bf16, the similarity products after them in fp32 for every method: bf16
    would cost about 1% of each logit (10% once exponentiated at T = 0.1)."""
    method, batch = _fixed_batch(name)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(batch, StepContext(epoch=1))
        features = method.encoder(batch.views[0])
    assert features.dtype == torch.bfloat16  # the autocast is real
    assert out.loss.dtype == torch.float32
    if out.logits is not None:
        assert out.logits.dtype == torch.float32
    if name != "byol":  # its cosine regression has no product to check against; the loss's dtype above
        reported, fp32 = _logits_from_outputs(name, method, out)
        torch.testing.assert_close(reported, fp32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, extra, expected", [
    ("moco", [], 4), ("end_to_end", [], 6), ("memory_bank", [], 3), ("moco_v3", [], 8), ("simclr", [], 6),
    ("byol", [], 8), ("swav", [], 6), ("moco", ["model.symmetric=true"], 8),
    ("moco", ["aug.local_crops=2", "aug.local_size=8"], 4 + 2 * 3 / 4), ("moco_v3", ["moco_v3.symmetric=false"], 4),
    ("swav", ["aug.local_crops=2", "aug.local_size=8"], 6 + 2 * 3 / 4), ("end_to_end", ["model.symmetric=true"], 6)])
def test_each_method_declares_the_encoder_work_its_step_does(name: str, extra: list[str], expected: float) -> None:
    """The folder preset's epochs divide by ``encoder_passes``: here the pixels each step sends through
    the encoders' stems are counted, a trained view (forward + backward) as 3 and a target's as 1."""
    torch.manual_seed(0)
    config = load_config(None, TINY_MODEL + [f"model.method={name}", "data.image_size=16", "optim.batch_size=16",
                                             "model.K=64", *extra])
    method = build_method(config, channels=1, bank_size=64)
    passes: list[float] = []

    def count(stem: torch.nn.Conv2d, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        trained = torch.is_grad_enabled() and stem.weight.requires_grad
        passes.append((3.0 if trained else 1.0) * inputs[0][:, 0].numel() / (16 * 16 * 16))

    stems = [m for m in method.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 1]
    assert 1 <= len(stems) <= 2
    for stem in stems:
        stem.register_forward_hook(count)
    views = [torch.rand(16, 1, 16, 16) for _ in range(2)] + [torch.rand(16, 1, 8, 8) for _ in range(config.aug.local_crops)]
    method.training_step(Batch(tuple(views), torch.arange(16)), StepContext())
    assert sum(passes) == pytest.approx(method.encoder_passes(config)) == expected


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.filterwarnings("ignore::moco.diagnostics.CollapseWarning")  # 30 tiny steps: mechanics, not learning
def test_kill_and_resume_is_exact_for_every_method(tmp_path: Path, name: str) -> None:
    config_path = tiny_config(tmp_path, model__method=name)
    reference = tmp_path / "reference"
    pretrain(load_config(config_path, [f"train.output_dir={reference}"]))
    run = tmp_path / "run"
    killed = run_moco("pretrain", str(config_path), f"train.output_dir={run}", "train.checkpoint_every_steps=4",
                      inject=True, MOCO_FAULT_KILL_BEFORE_STEP="13")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Resumed in this process: a fresh interpreter per method would add seconds of imports, and the
    # command line's --resume is tested on its own (tests/test_resume.py).
    pretrain(load_config(config_path, [f"train.output_dir={run}", "train.checkpoint_every_steps=4"]), resume="auto")
    assert_identical_runs(reference, run)
    assert load_checkpoint(run / "checkpoint_last.pth")["method"] == name


def test_the_loop_owns_the_momentum_schedule() -> None:
    constant = load_config(None, ["model.m=0.99", "optim.epochs=10"])
    cosine = load_config(None, ["model.m=0.99", "model.m_schedule=cosine", "optim.epochs=10"])
    assert [momentum_at(constant, s, 10) for s in (0, 50, 100)] == [0.99] * 3  # 10 steps an epoch, 100 in all
    assert momentum_at(cosine, 0, 10) == pytest.approx(0.99) and momentum_at(cosine, 100, 10) == 1.0
    assert momentum_at(cosine, 50, 10) == pytest.approx(0.995)
    method, _ = _fixed_batch("moco")
    assert method.momentum_pairs() == [(method.encoder_k, method.encoder_q)]


def test_each_view_gets_the_augmentation_its_method_asks_for(tmp_path: Path) -> None:
    config = load_config(tiny_config(tmp_path))
    data = build_data(config)
    method = build_method(config, data.channels)
    shared = view_augmentations(config, data, method)
    assert len(shared) == 2 and shared[0] is shared[1]  # MoCo v1/v2: one augmentation, both views

    class Asymmetric(type(method)):  # e.g. BYOL / MoCo v3: blur on one view, solarize on the other
        def view_augmentations(self, spec: AugmentSpec, local_spec: AugmentSpec | None, local_crops: int) -> list:
            return [replace(spec, blur_p=1.0), replace(spec, blur_p=0.1, solarize_p=0.2)]

    method.__class__ = Asymmetric
    first, second = view_augmentations(config, data, method)
    assert first is not second and (first.spec.blur_p, second.spec.solarize_p) == (1.0, 0.2)


def test_checkpoints_store_the_backbone_spec_and_loading_dispatches_on_it(tmp_path: Path) -> None:
    path, _ = save_tiny_moco_checkpoint(tmp_path, extra=["model.stem_stride=2"])
    ckpt = load_checkpoint(path)
    assert ckpt["backbone"] == {"arch": "resnet18", "widths": [4, 8, 8, 8], "small_images": True, "in_channels": 1,
                                "head": "mlp", "dim": 128, "stem_stride": 2, "family": "resnet", "head_layers": 0,
                                "head_hidden": 0, "head_last_bn": True, "image_size": 0, "patch_size": 0}
    ckpt["config"]["model"]["stem_stride"] = 1  # the spec, not the config, says how to build it
    save_atomic(ckpt, path)
    assert load_pretrained(path).spec.stem_stride == 2
    ckpt["backbone"]["family"] = "convnext"
    save_atomic(ckpt, path)
    with pytest.raises(CheckpointFormatError, match="its backbone is a 'convnext', which this version of moco cannot"):
        load_pretrained(path)


def _module_level_imports(path: Path) -> set[str]:
    """The moco modules ``path`` imports when it is imported (not those under TYPE_CHECKING or in functions)."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moco"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from moco import distributed`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("moco"))
    return {name for name in found if name != module}


def test_no_import_cycles_and_evaluation_does_not_import_the_training_loop() -> None:
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    graph = {name: {m for m in _module_level_imports(path) if m in modules and m != "moco"}
             for name, path in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in trail and len(trail) < len(graph):
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in (cycle_from(m) for m in graph) if c]
    assert not cycles, f"import cycle: {' -> '.join(cycles[0])}"
    probe = ("import sys, moco.evaluate.common, moco.evaluate.report, moco.evaluate.finetune, moco.exporters, "
             "moco.cli_eval; print(sorted(m for m in sys.modules if m in ('moco.train', 'moco.step', 'moco.ablate')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_runs_thread_setting_holds_during_the_run_and_not_after_it(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    config = load_config(tiny_config(tmp_path), ["optim.epochs=1", "train.threads=1", "train.knn_every=0"])
    pretrain(config)
    assert json.loads((Path(config.train.output_dir) / "resolved.json").read_text())["threads"] == 1
    assert torch.get_num_threads() == 2  # a notebook or test run is not left on one core


@pytest.mark.parametrize("name", ["moco", "moco_v3"])
def test_a_compiled_run_traces_without_graph_breaks_and_trains_like_an_eager_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """train.compile compiles each network in place (traced here without code generation): the
    step breaks no graph, and the run's losses and checkpoint keys are the eager run's."""
    import torch._dynamo

    from moco import runtime

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")
    config_path = tiny_config(tmp_path, optim__epochs=1)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = tmp_path / f"compiled_{compiled}"
        pretrain(load_config(config_path, [f"model.method={name}", f"train.output_dir={run}", "train.knn_every=0",
                                           "train.test_knn=false", f"train.compile={str(compiled).lower()}"]))
        runs[compiled] = run
        assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert sum(torch._dynamo.utils.counters["stats"].values()) > 0  # dynamo did trace the compiled run
    losses = [[row["loss"] for row in read_metrics(run) if row["kind"] == "train"] for run in (runs[False], runs[True])]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) == 10
    eager, compiled = (load_checkpoint(runs[c] / "checkpoint_last.pth")["model"] for c in (False, True))
    assert eager.keys() == compiled.keys()
