"""scripts/device_check.sh, the one prepared call for a GPU machine, runs its whole plan on the CPU
(DEVICE_CHECK_SMOKE=1, tiny sizes): every check passes, every case writes its JSON, the summary
table has every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("resume", "methods", "split_bn_layouts", "streamed_infonce_bf16", "host_reads")
CASES = ("resnet18_cifar", "resnet50_224", "resnet50_224_nchw", "jpeg_data_w1", "vit_small_224", "fmnist_loop")


def test_the_device_check_runs_its_plan_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "DEVICE_CHECK_SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "2"}
    result = subprocess.run(["bash", "scripts/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for check in CHECKS:
        found = json.loads((tmp_path / f"{check}.json").read_text())
        assert found["ok"], (check, found)
    assert json.loads((tmp_path / "methods.json").read_text())["methods"].keys() >= {"moco", "moco_v3", "swav"}
    for case in CASES:
        results = json.loads((tmp_path / f"{case}.json").read_text())["results"]
        assert results and all(r["img_s"] for r in results), (case, results)
    summary = (tmp_path / "summary.txt").read_text()
    for row in ("ResNet-18 CIFAR pairs/s", "K ratio", "ResNet-50 224 MoCo step img/s (NCHW)", "JPEG data img/s, 1 workers",
                "ViT-S/16 MoCo v3", "real loop / step"):
        assert row in summary
    assert "FAILED" not in summary and "not run" not in summary
