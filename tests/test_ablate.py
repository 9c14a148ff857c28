"""`moco ablate`: divergence detection, a tiny sweep per ablation, resume, the three artifacts."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from moco.ablate import (METHOD_LABELS, Point, chance_of, diagnose, load_preset, plan, plot_results, queue_of,
                         resolve_preset, results_markdown, run_point, sweep)
from moco.checkpoint import load_checkpoint
from moco.cli import main
from moco.config import ConfigError, load_config
from moco.methods import METHODS
from tests.conftest import needs_fashion_mnist

# One tiny point per mechanism: 4-8-8-8 ResNet, 300 pretraining images (400 - 100 held out), batch 16, one epoch.
TINY = ["model.widths=[4,8,8,8]", "model.bn_splits=2", "data.train_subset=400", "data.val_size=100",
        "data.test_subset=200", "optim.epochs=1", "optim.batch_size=16", "train.knn_bank_size=300",
        "train.knn_k=20", "ablate.dictionary.K=[16]"]


def test_diagnose_flags_nan_and_loss_stuck_at_chance() -> None:
    chance = math.log(4096 + 1)
    assert diagnose([8.0, 7.5, float("nan"), 7.0], chance)[0] == "diverged"
    assert diagnose([8.0, float("inf")], chance)[0] == "diverged"
    status, reason = diagnose([chance + 0.01 * (-1) ** i for i in range(40)], chance)
    assert status == "failed" and f"stuck at chance = {chance:.2f}" in reason
    status, reason = diagnose([5.0 + 0.3 * (-1) ** i for i in range(40)], chance)  # oscillating, not at chance
    assert status == "failed" and "not decreasing" in reason
    assert diagnose([8.3 - 0.1 * i for i in range(40)], chance)[0] == "ok"
    # A memory bank's loss rises while random entries are replaced, then falls: fine.
    assert diagnose([6.0, 8.0, 10.0, 10.5, 10.0, 9.5, 9.0, 8.5, 8.0, 7.5], math.log(257))[0] == "ok"
    # SwAV's chance is log(prototypes); BYOL has none, so a flat curve is only "not decreasing".
    assert "stuck at chance = 4.61" in diagnose([math.log(100)] * 40, math.log(100))[1]
    assert "not decreasing" in diagnose([1.0] * 40, None)[1]


def test_the_chance_a_point_is_judged_against_is_the_one_its_method_logged() -> None:
    rows = [{"kind": "train", "loss": 4.0, "chance_loss": math.log(100)}, {"kind": "epoch", "loss": 4.0}]
    assert chance_of(rows, 0) == pytest.approx(math.log(100))
    assert chance_of([{"kind": "train", "loss": 1.0}], 4096) == pytest.approx(math.log(4097))
    assert chance_of([{"kind": "train", "loss": 1.0}], 0) is None


def test_end_to_end_points_use_batch_k_and_are_capped() -> None:
    base, sweep_config = load_preset(resolve_preset("fmnist_cpu"), ["ablate.dictionary.K=[256,1024,4096]"])
    points, notes = plan("dictionary", base, sweep_config)
    e2e = {p.name: p for p in points if p.labels["method"] == "end_to_end"}
    assert sorted(e2e) == ["end_to_end_K1024", "end_to_end_K256"]  # 4096 > end_to_end_max_batch
    assert e2e["end_to_end_K256"].config["optim"]["batch_size"] == 256 and e2e["end_to_end_K256"].negatives == 255
    assert any("K = 4096 were not run" in n and "Gradient accumulation" in n for n in notes)
    with pytest.raises(ConfigError, match="ablate point moco_K100: model.K"):
        plan("dictionary", *load_preset(resolve_preset("fmnist_cpu"), ["ablate.dictionary.K=[100]"]))
    with pytest.raises(ConfigError, match="did you mean ablate.momentum.m"):
        load_preset(resolve_preset("fmnist_cpu"), ["ablate.momentum.mm=[0.9]"])


@needs_fashion_mnist
def test_tiny_dictionary_sweep_writes_the_three_artifacts_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    summary = sweep("dictionary", "fmnist_cpu", TINY, output=str(out), jobs=1, threads=1)
    points = {p["name"]: p for p in summary["points"]}
    assert sorted(points) == ["end_to_end_K16", "memory_bank_K16", "moco_K16"]
    assert [points[n]["negatives"] for n in ("moco_K16", "memory_bank_K16", "end_to_end_K16")] == [16, 16, 15]
    for p in points.values():
        assert p["status"] in ("ok", "failed") and 0 < p["test_knn_top1"] <= 100 and len(p["epochs"]) == 1
    assert json.loads((out / "results.json").read_text())["points"][0]["name"] == "moco_K16"
    md = (out / "results.md").read_text()
    assert "| MoCo |" in md and "| memory bank |" in md and "| end-to-end |" in md and "![dictionary]" in md
    assert (out / "dictionary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = capsys.readouterr().out
    assert "Gradient accumulation" in first and "estimate: about " in first and "moco_K16 " in first
    assert "[1] moco_K16: " in first and " left\n" in first  # each point's line says how long the rest takes
    bank = load_checkpoint(out / "memory_bank_K16" / "checkpoint_last.pth")["model"]["bank.features"]
    assert bank.shape == (300, 128)  # one entry per pretraining image, checkpointed with the weights
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(300))

    # Again: every point is finished, nothing trains. Then a point without its result resumes.
    (out / "memory_bank_K16" / "point.json").unlink()
    capsys.readouterr()
    sweep("dictionary", "fmnist_cpu", TINY, output=str(out), jobs=1, threads=1)
    printed = capsys.readouterr().out
    assert printed.count("[done before]") == 2 and "1 to run" in printed
    assert "--- memory_bank_K16: resuming" in (out / "memory_bank_K16" / "log.txt").read_text()


@needs_fashion_mnist
def test_diverging_points_are_reported_and_the_parallel_sweep_goes_on(tmp_path: Path, capsys) -> None:
    out = tmp_path / "momentum"
    overrides = [*TINY, "ablate.momentum.K=64", "ablate.momentum.m=[0.9,0.99]", "optim.lr=1.0e30"]
    sweep("momentum", "fmnist_cpu", overrides, output=str(out), jobs=2)  # two worker processes
    assert "2 at a time with 1 thread(s) each" in capsys.readouterr().out
    points = json.loads((out / "results.json").read_text())["points"]
    assert [(p["name"], p["status"]) for p in points] == [("m0.9", "diverged"), ("m0.99", "diverged")]
    assert "loss is nan" in points[0]["reason"] or "loss is inf" in points[0]["reason"]
    assert "| kNN top-1 | **diverged** | **diverged** |" in (out / "results.md").read_text()
    assert (out / "momentum.png").is_file()


def test_a_point_that_cannot_resume_replaces_the_older_run_in_its_directory(tiny_reference: tuple[Path, Path],
                                                                            tmp_path: Path) -> None:
    """Its config changed (3 epochs then, 1 now), so the point starts afresh over the old run."""
    config_path, reference_run = tiny_reference
    directory = tmp_path / "point"
    shutil.copytree(reference_run, directory)
    config = load_config(config_path, ["optim.epochs=1"]).to_dict()
    result = run_point(Point("p", config, {}, negatives=64), str(directory))
    assert result["status"] != "error", result["reason"]
    assert [e["epoch"] for e in result["epochs"]] == [1]
    assert "--- p: starting" in (directory / "log.txt").read_text()
    assert sorted(p.name for p in directory.glob("checkpoint_*.pth")) == ["checkpoint_epoch0001.pth",
                                                                         "checkpoint_last.pth"]


def _fake(name: str, status: str, knn: float, **labels) -> dict:
    epochs = [{"epoch": e, "loss": 5.0 - e, "pretext_acc": 50.0 + 10 * e, "val_knn_top1": knn - 3 + e}
              for e in (1, 2, 3)]
    config = {"train": {"knn_k": 200, "knn_t": 0.1}, "optim": {"batch_size": 128, "epochs": 3}}
    return {"name": name, "status": status, "reason": "" if status == "ok" else "loss not decreasing",
            "test_knn_top1": knn, "val_knn_top1": knn, "final_loss": 2.0, "seconds": 75.0, "negatives": 4096,
            "epochs": epochs, "train_losses": [[1, 8.0], [2, 7.0]], "config": config, **labels}


def test_overwrite_trains_finished_points_again_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys) -> None:
    import moco.ablate as ablate

    points = [Point(name, {"train": {"threads": 1}}, {}, negatives=16) for name in ("a", "b")]
    trained: list[tuple[str, bool]] = []

    def run_point(point: Point, run_dir: str, fresh: bool = False) -> dict:
        trained.append((point.name, fresh))
        return _fake(point.name, "ok", 70.0)

    monkeypatch.setattr(ablate, "finished_result", lambda run_dir, config: _fake(Path(run_dir).name, "ok", 60.0))
    monkeypatch.setattr(ablate, "point_estimates", lambda pending: {p.name: 60.0 for p in pending})
    monkeypatch.setattr(ablate, "run_point", run_point)
    results: dict = {}
    ablate._run_points(points, tmp_path, 1, results)
    assert trained == [] and capsys.readouterr().out.count("[done before]") == 2
    results = {}
    ablate._run_points(points, tmp_path, 1, results, overwrite=True)
    assert trained == [("a", True), ("b", True)] and results["a"]["test_knn_top1"] == 70.0
    printed = capsys.readouterr().out
    assert "estimate: about 2 m 00 s of training steps" in printed and "[1] a: ok, kNN top-1 70.00%" in printed


def test_momentum_and_shuffle_bn_tables_and_plots(tmp_path: Path) -> None:
    momentum = [_fake("m0", "failed", 40.0, m=0.0, K=4096), _fake("m0.99", "ok", 78.5, m=0.99, K=4096)]
    md = results_markdown("momentum", momentum, [], Path("fmnist_cpu.yaml"), ["optim.epochs=3"], [Path("momentum.png")])
    assert "| m | 0 | 0.99 |" in md and "| kNN top-1 | **failed** (40.00) | 78.50 |" in md
    assert "`moco ablate momentum fmnist_cpu optim.epochs=3`" in md and "| m0.99 | 4096 | 128 | 3/3 | ok | 78.50 | 2.000 | 80.00 | 1 m 15 s | - |" in md
    assert plot_results("momentum", momentum, tmp_path)[0].is_file()
    shuffle = [_fake("shuffle_bn", "ok", 70.0, shuffle_bn=True), _fake("no_shuffle_bn", "ok", 60.0, shuffle_bn=False)]
    md = results_markdown("shuffle-bn", shuffle, [], Path("fmnist_cpu.yaml"))
    assert "| 2 | 70.00 | 70.00 | 69.00 | 59.00 |" in md
    assert plot_results("shuffle-bn", shuffle, tmp_path)[0].name == "shuffle_bn.png"


@needs_fashion_mnist
def test_tiny_methods_sweep_compares_at_equal_epochs_and_equal_time(tmp_path: Path) -> None:
    out = tmp_path / "methods"
    overrides = TINY + ["model.K=16", "ablate.methods.methods=[moco,byol]", "ablate.methods.linear_epochs=2",
                        "ablate.methods.linear_lrs=[1.0]", "ablate.methods.finetune_fraction=0.1",
                        "ablate.methods.finetune_steps=2", "ablate.methods.finetune_val_size=20",
                        "ablate.methods.per_method.byol={byol.mlp_dim: 16}"]
    summary = sweep("methods", "fmnist_cpu", overrides, output=str(out), jobs=1, threads=1)
    points = {p["name"]: p for p in summary["points"]}
    assert sorted(points) == ["byol_epochs", "byol_time", "moco_epochs", "moco_time"]
    byol = points["byol_epochs"]
    assert (byol["negatives_from"], byol["momentum_encoder"], byol["predictor"]) == ("none", True, True)
    for p in points.values():
        assert 0 <= p["linear_top1"] <= 100 and 0 <= p["finetune_top1"] <= 100 and p["img_s"] > 0
        assert p["peak_memory_mb"] > 50  # a process of its own: torch alone takes more
    assert points["moco_time"]["test_knn_top1"] == points["moco_epochs"]["test_knn_top1"]  # the reference: one run
    assert not (out / "moco_time").exists()
    md = (out / "results.md").read_text()
    assert "## Equal epochs" in md and "## Equal wall-clock" in md and "| BYOL | none | yes | yes | no |" in md
    assert "| MoCo | queue | yes | no | 16 keys |" in md
    baselines = summary["baselines"]
    assert set(baselines) == {"random init", "raw pixels (centred)"}
    assert all(0 <= v <= 100 for v in baselines["random init"].values()) and len(baselines["random init"]) == 3
    assert "## Baselines" in md and "| raw pixels (centred) |" in md
    assert json.loads((out / "baselines.json").read_text())["baselines"] == baselines  # kept for a re-run
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_fashion_mnist
def test_every_registered_method_runs_as_a_tiny_sweep_point(tmp_path: Path) -> None:
    """Each method of the registry, with the preset's own settings for it, trains as a sweep point
    in a process of its own and lands in the tables (2 epochs: the preset's LARS warm-up is 1)."""
    out = tmp_path / "all"
    overrides = TINY + ["data.train_subset=200", "data.test_subset=100", "train.knn_bank_size=100",
                        "optim.epochs=2", "model.K=16", f"ablate.methods.methods=[{','.join(METHODS)}]",
                        "ablate.methods.equal_time=false", "ablate.methods.baselines=false",
                        "ablate.methods.linear_epochs=0", "ablate.methods.finetune_fraction=0"]
    summary = sweep("methods", "fmnist_cpu", overrides, output=str(out), jobs=2, threads=1)
    points = {p["method"]: p for p in summary["points"]}
    assert list(points) == list(METHODS)
    md = (out / "results.md").read_text()
    for method, point in points.items():
        assert point["status"] in ("ok", "failed"), (method, point["reason"])  # 12 steps may not lower the loss
        assert 0 <= point["test_knn_top1"] <= 100 and point["img_s"] > 0 and point["peak_memory_mb"] > 50
        for artifact in ("point.json", "log.txt", "checkpoint_last.pth", "metrics.jsonl"):
            assert (out / point["name"] / artifact).is_file(), (method, artifact)
        assert f"| {METHOD_LABELS[method]} |" in md
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_queue_column_names_what_a_method_keeps_from_earlier_batches() -> None:
    config = {"model": {"K": 4096}, "swav": {"queue_length": 0}}
    assert queue_of("moco", config) == "4096 keys"
    assert queue_of("swav", config) == "no" and queue_of("memory_bank", config) == "no"
    assert queue_of("swav", {**config, "swav": {"queue_length": 3840}}) == "3840 features"


def test_cli_lists_presets_and_rejects_unknown_ones(capsys) -> None:
    assert main(["ablate", "dictionary"]) == 0
    assert {"fmnist_cpu", "cifar10_gpu", "imagenet100_gpu"} <= set(capsys.readouterr().out.split())
    assert main(["ablate", "momentum", "nope"]) == 2
    assert capsys.readouterr().err.startswith("moco: error: ablation preset 'nope' is neither a file nor")


def test_sweep_workers_exit_when_the_sweep_process_is_killed(tmp_path: Path) -> None:
    """A killed `moco ablate` must not leave point workers training on as orphans, even before the
    sweep is reaped (the workers are forked by a fork server, not by the sweep itself); and workers
    see the sweep's environment, not the one the fork server started with."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from moco.ablate import _exit_with_sweep, _worker_context\n"
        "from multiprocessing import forkserver\n"
        "if __name__ == '__main__':\n"
        "    context = _worker_context()\n"
        "    forkserver.ensure_running()\n"
        "    os.environ['MOCO_SWEEP_TEST'] = 'set after the fork server started'\n"
        "    pool = ProcessPoolExecutor(1, mp_context=context, initializer=_exit_with_sweep,\n"
        "                               initargs=(os.getpid(), dict(os.environ)))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    print(pool.submit(os.getenv, 'MOCO_SWEEP_TEST').result(), flush=True)\n"
        "    pool.submit(time.sleep, 120)\n"
        "    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "set after the fork server started"  # the sweep's environment
    parent.send_signal(signal.SIGKILL)
    try:  # not reaped yet: a zombie sweep must count as dead
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived its sweep process by 20 s")
    finally:
        parent.wait()
