"""``moco bench``: the cases time what they say, the ratios are taken between the right cases, the JSON is complete."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
import torch

from moco.bench import (CaseResult, Setting, Timing, plan, pool_rounds, ratios, ratios_over_rounds, run_bench,
                        synthetic_views, time_blocks)
from moco.cli import main
from moco.config import ConfigError, load_config
from tests.tiny import tiny_config


def test_time_blocks_runs_warmup_then_repeats_of_steps() -> None:
    calls = []
    rates = time_blocks(lambda: calls.append(1) or 4, torch.device("cpu"), Timing(warmup=2, steps=3, repeats=4))
    assert len(calls) == 2 + 3 * 4
    assert len(rates) == 4 and all(r > 0 for r in rates)


def test_plan_times_the_moco_step_once_per_queue_size_and_at_the_loops_K() -> None:
    pairs = plan(["encoder", "moco", "memory_bank", "loop"], [4096, 65536], config_K=1024)
    assert pairs == [("encoder", None), ("moco", 4096), ("moco", 65536), ("moco", 1024), ("memory_bank", 4096),
                     ("loop", None)]
    assert plan(["moco"], [4096, 4096], config_K=4096) == [("moco", 4096)]
    assert plan(["moco_v3", "simclr"], [4096], 4096) == [("moco_v3", None), ("simclr", None)]  # every method
    with pytest.raises(ConfigError, match="--cases: unknown case 'dino'"):
        plan(["dino"], [4096], 4096)
    with pytest.raises(ConfigError, match="--queue-sizes"):
        plan(["moco"], [0], 4096)


def test_synthetic_views_give_multi_crop_its_small_views_at_the_default_size() -> None:
    config = load_config(None, ["data.image_size=32", "optim.batch_size=8", "aug.local_crops=2"])  # local_size 0: half
    views = synthetic_views(config, torch.device("cpu"), torch.contiguous_format, local=True)
    assert [tuple(v.shape) for v in views] == [(8, 1, 32, 32)] * 2 + [(8, 1, 16, 16)] * 2


def test_ratios_are_times_per_image_and_the_loop_a_speed() -> None:
    results = [CaseResult("encoder", 1000.0), CaseResult("encoder+sgd", 900.0),
               CaseResult("moco", 800.0, K=4096), CaseResult("moco", 640.0, K=65536),
               CaseResult("loop", 720.0, K=4096), CaseResult("lightly", 400.0, K=4096)]
    found = ratios(results, config_K=4096)
    assert found["moco step (K=4096) / raw encoder work"] == pytest.approx(1.25)
    assert found["moco step (K=4096) / encoder work + optimiser step"] == pytest.approx(1.125)
    assert found["moco step K=65536 / K=4096"] == pytest.approx(1.25)
    assert found["real loop's speed / isolated moco step's (K=4096)"] == pytest.approx(0.9)
    assert found["moco step / lightly's MoCo step (K=4096)"] == pytest.approx(0.5)
    per_image = ratios(results + [CaseResult("moco_v3", 400.0), CaseResult("memory_bank", 1000.0, K=4096)], 4096)
    assert per_image["moco_v3 step / moco step (K=4096), time per image"] == pytest.approx(2.0)  # the folder's epochs
    assert per_image["memory_bank step / moco step (K=4096), time per image"] == pytest.approx(0.8)



def test_rounds_pool_every_block_and_take_each_ratio_within_its_round() -> None:
    """On a shared host a whole round may run at half speed: the ratio of each round still holds."""
    fast = [CaseResult("encoder", 1000.0, repeats=[1000.0, 1000.0], peak_memory_mb=10.0),
            CaseResult("moco", 800.0, K=4096, repeats=[800.0, 800.0], peak_memory_mb=12.0)]
    slow = [CaseResult("encoder", 500.0, repeats=[500.0, 500.0], peak_memory_mb=11.0),
            CaseResult("moco", 400.0, K=4096, repeats=[400.0, 400.0], peak_memory_mb=9.0)]
    pooled = pool_rounds([fast, slow, fast])
    assert [r.img_s for r in pooled] == [1000.0, 800.0]
    assert (pooled[0].img_s_min, pooled[0].img_s_max, len(pooled[0].repeats)) == (500.0, 1000.0, 6)
    assert [r.peak_memory_mb for r in pooled] == [11.0, 12.0] and pooled[1].K == 4096
    found, per_round = ratios_over_rounds([fast, slow, fast], config_K=4096)
    assert per_round["moco step (K=4096) / raw encoder work"] == pytest.approx([1.25, 1.25, 1.25])
    assert found["moco step (K=4096) / raw encoder work"] == pytest.approx(1.25)
    skipped = [CaseResult("lightly", None, detail="not run", skipped=True)]
    assert pool_rounds([skipped, skipped])[0].detail == "not run"


def test_interleaved_bench_times_one_block_of_every_case_per_round_in_one_process(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = run_bench(Setting(str(tiny_config(tmp_path)), [], Timing(1, 2, 3)), ["encoder", "moco", "loop"], [32],
                        report=lines.append, mode="interleaved")
    assert len(summary["rounds"]) == 3
    assert all([(r["case"], r["K"]) for r in one] == [("encoder", None), ("moco", 32), ("moco", 64), ("loop", 64)]
               and all(len(r["repeats"]) == 1 and r["img_s"] > 0 for r in one) for one in summary["rounds"])
    assert all(len(r["repeats"]) == 3 for r in summary["results"])  # pooled: one block per round
    name = "moco step (K=32) / raw encoder work"
    assert len(summary["ratios_per_round"][name]) == 3
    assert summary["ratios"][name] == pytest.approx(sorted(summary["ratios_per_round"][name])[1])
    assert summary["environment"]["interleave"] and "interleaved in one process" in lines[0]
    assert not list(tmp_path.glob("moco-bench-*"))  # the loop's scratch folder lives in the system's temp


def test_interleaved_bench_skips_a_case_the_config_cannot_build_and_times_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default mode, like the others, says why a case did not run instead of stopping the bench,
    and leaves no scratch folder behind for it."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    setting = Setting(str(tiny_config(tmp_path)), [f"data.root={tmp_path / 'missing'}"], Timing(0, 1, 2))
    summary = run_bench(setting, ["encoder", "data"], [32], report=lambda _: None, mode="interleaved")
    assert not list(scratch.iterdir())
    encoder, data = summary["results"]
    assert encoder["img_s"] > 0 and not encoder["skipped"]
    assert data["skipped"] and data["detail"].startswith("not run: data.root") and "missing" in data["detail"]
    with pytest.raises(ValueError, match="bench mode 'fast' is not one of interleaved, isolated, same-process"):
        run_bench(setting, ["encoder"], [32], mode="fast")


def test_bench_runs_every_case_on_the_tiny_config(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    lines: list[str] = []
    summary = run_bench(Setting(str(config), [], Timing(1, 2, 2)),
                        ["encoder", "encoder+sgd", "moco", "end_to_end", "memory_bank", "moco_v3", "data", "loop"], [32, 128],
                        mode="same-process", report=lines.append)
    cases = [(r["case"], r["K"]) for r in summary["results"]]
    assert cases == [("encoder", None), ("encoder+sgd", None), ("moco", 32), ("moco", 128), ("moco", 64),
                     ("end_to_end", 15), ("memory_bank", 32), ("moco_v3", None), ("data", None), ("loop", 64)]
    for result in summary["results"]:
        assert not result["skipped"], result
        assert len(result["repeats"]) == 2 and result["img_s_min"] <= result["img_s"] <= result["img_s_max"]
        assert result["batch"] == 16 and result["peak_memory_mb"] > 0
    assert set(summary["ratios"]) == {"moco step (K=32) / raw encoder work",
                                      "moco step (K=32) / encoder work + optimiser step", "moco step K=128 / K=32",
                                      "real loop's speed / isolated moco step's (K=64)",
                                      *(f"{m} step / moco step (K=32), time per image" for m in ("end_to_end", "memory_bank", "moco_v3"))}
    assert summary["environment"]["threads"] == 1 and summary["environment"]["timing"]["steps"] == 2
    assert lines[0].startswith("torch ") and len(lines) == 1 + 10 + 7


def test_bench_command_writes_its_json_and_isolates_the_cases(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tiny_config(tmp_path)
    out = tmp_path / "bench.json"
    assert main(["bench", str(config), "--cases", "moco", "--queue-sizes", "32", "--steps", "1",
                 "--repeats", "1", "--warmup", "0", "--mode", "isolated", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert [(r["case"], r["K"]) for r in summary["results"]] == [("moco", 32)]
    assert summary["results"][0]["img_s"] > 0 and not summary["environment"]["interleave"]
    assert f"wrote {out}" in capsys.readouterr().out
    # Interleaved is the default: on a host whose speed drifts only within-round ratios hold.
    assert main(["bench", str(config), "--cases", "encoder,moco", "--queue-sizes", "32", "--steps", "1",
                 "--repeats", "2", "--warmup", "0", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["environment"]["interleave"] and len(summary["rounds"]) == 2
    assert "interleaved in one process" in capsys.readouterr().out
    # One interleaved round still prints each case's img/s, not only the ratios.
    assert main(["bench", str(config), "--cases", "encoder,moco", "--queue-sizes", "32", "--steps", "1",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 round of one 1-step block" in printed
    assert [line.split()[0] for line in printed.splitlines() if "img/s" in line] == ["encoder", "moco"]
    assert main(["bench", str(config), "--cases", "encoder", "--steps", "0"]) == 2
    assert main(["bench", str(config), "--cases", "encoder", "--rounds", "0"]) == 2


def test_lightly_case_runs_where_lightly_is_installed_and_says_how_to_get_it_elsewhere(tmp_path: Path) -> None:
    summary = run_bench(Setting(str(tiny_config(tmp_path)), [], Timing(0, 1, 1)), ["moco", "lightly"], [32],
                        mode="same-process", report=lambda _: None)
    lightly = summary["results"][1]
    if importlib.util.find_spec("lightly") is None:
        assert lightly["skipped"] and "pip install -e '.[bench]'" in lightly["detail"]
    else:
        assert lightly["img_s"] > 0 and lightly["K"] == 32
        assert "moco step / lightly's MoCo step (K=32)" in summary["ratios"]
