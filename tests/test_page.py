"""`moco page`: one HTML page per run that references only files that exist, and whose every image a
headless browser loads."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moco.cli import main
from moco.config import load_config
from moco.page import markdown_to_html, write_page
from moco.train import pretrain
from tests.tiny import tiny_config

BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("page")
    config = load_config(tiny_config(tmp), ["optim.epochs=2"])
    run = pretrain(config).run_dir
    (run / "knn.md").write_text("| features | k | top-1 (%) |\n|---|---|---|\n| MoCo | 20 | 81.25 |\n")
    with contextlib.redirect_stderr(io.StringIO()) as progress:
        assert main(["page", str(run), "--points", "60"]) == 0
    (run / "page_progress.txt").write_text(progress.getvalue())
    return run / "page" / "index.html"


def test_the_page_references_only_files_that_exist(page: Path) -> None:
    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert set(sources) == {"curves.png", "knn.png", "diagnostics.png", "map.png", "neighbours.png"}
    for source in sources:
        assert (page.parent / source).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", source
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', text)  # nothing from a server
    assert "<td>81.25</td>" in text and "t-SNE" in text and "model:" in text


def test_the_page_says_what_it_draws_and_how_long_embedding_takes(page: Path) -> None:
    lines = (page.parent.parent / "page_progress.txt").read_text().splitlines()
    assert lines[0].startswith(f"page for {page.parent.parent}: curves of ") and "a map of 60 embedded" in lines[0]
    assert lines[1].startswith("embedding ") and " images of fashion_mnist:test with the backbone of " in lines[1]


@pytest.mark.skipif(BROWSER is None, reason="no headless chromium (scripts/test.sh installs chromium-headless-shell)")
def test_a_headless_browser_renders_the_page_with_every_image_loaded(page: Path, tmp_path: Path) -> None:
    dom = subprocess.run([BROWSER, "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded is not None, dom.stdout[-2000:]
    assert loaded.group(1) == loaded.group(2) == "5"


def test_an_unlabelled_folder_run_gets_a_page_without_colours(tmp_path: Path) -> None:
    config = load_config(tiny_config(tmp_path, folder_workers=1), ["optim.epochs=1"])
    images = Path(config.data.root)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, file in enumerate(sorted(images.rglob("*.png"))[:80]):
        shutil.copyfile(file, flat / f"{i:03d}.png")
    config.data.root, config.data.val_size = str(flat), 0
    run = pretrain(config).run_dir
    path = write_page(run, points=40)
    text = path.read_text()
    assert "by label" not in text and (path.parent / "map.png").is_file() and (path.parent / "neighbours.png").is_file()


def test_markdown_tables_become_html_tables() -> None:
    out = markdown_to_html("# Title\n\n| a | b |\n|---|---|\n| 1 | <2> |\ntext")
    assert "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>&lt;2&gt;</td></tr>" in out
    assert "<p>Title</p>" in out and "<p>text</p>" in out


def test_a_folder_runs_page_sets_its_backbone_beside_the_baselines() -> None:
    from moco.page import baselines_table, markdown_to_html

    summary = {"knn_centred": True, "test_knn_top1_backbone": 71.5, "test_knn_top1_backbone_k10": 73.25,
               "test_knn_top1_backbone_k200": 71.5,
               "baselines": {"raw_pixels_k10": 68.65, "raw_pixels_k200": 64.53, "random_init_backbone": 40.0,
                             "random_init_encoder": 38.0}}
    table = baselines_table(summary)
    assert table.splitlines()[2] == "| this run's backbone, centred | 73.25 | 71.50 |"
    assert table.splitlines()[3] == "| centred raw pixels | 68.65 | 64.53 |"
    html = markdown_to_html(table)
    assert html.count("<tr>") == 4 and "73.25" in html and "40.00" in html
