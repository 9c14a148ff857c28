"""The documentation site: it builds with ``--strict`` offline (a broken link, a missing page or a
public name without a docstring fails it), and its generated reference pages list every command,
argument and config option."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from moco.options import describe_options

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "docs"))
import hooks  # noqa: E402  (docs/hooks.py: the site's generators and docstring check)


def test_the_site_builds_strictly_and_offline(tmp_path: Path) -> None:
    offline = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
               "NO_MKDOCS_2_WARNING": "1"}  # any fetch would fail: the build must need none
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, **offline}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for page in ("index.html", "getting-started/index.html", "reference/cli/index.html",
                 "reference/config/index.html", "reference/api/index.html", "benchmarks/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "reference/api/index.html").read_text()
    assert "load_pretrained" in api and "RunSummary" in api and "info_nce_loss" in api


def test_a_public_name_without_a_docstring_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("fake_api", "A module with a docstring.")

    def documented() -> None:
        """Says why."""

    def bare() -> None:
        pass

    class Thing:
        """A class."""

        def method(self) -> None:
            pass

    for obj in (documented, bare, Thing):
        obj.__module__ = "fake_api"
        setattr(module, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, "fake_api", module)
    assert sorted(hooks.undocumented("fake_api")) == ["fake_api.Thing.method", "fake_api.bare"]
    assert hooks.undocumented("fake_api", ["documented"]) == []
    page = "# API\n\n::: fake_api.documented\n\n::: fake_api\n    options:\n      members: [bare]\n"
    assert hooks.api_identifiers(page) == [("fake_api.documented", None), ("fake_api", ["bare"])]


def test_the_api_page_shows_every_name_of_the_package_front_door() -> None:
    import moco

    page = (REPO / "docs/reference/api.md").read_text()
    shown = {identifier.rsplit(".", 1)[-1] for identifier, _ in hooks.api_identifiers(page)}
    shown |= {member for _, members in hooks.api_identifiers(page) for member in members or ()}
    shown |= {"METHODS", "InfoNCELoss", "info_nce_logits", "info_nce_loss"}  # module members: moco.methods, moco.loss
    assert set(moco.__all__) <= shown, set(moco.__all__) - shown


def test_the_config_reference_lists_every_option_with_its_comment() -> None:
    page = hooks.config_reference()
    sections = describe_options()
    assert {"model", "data", "aug", "optim", "train", "moco_v3", "swav"} <= set(sections)
    for options in sections.values():
        for option in options:
            assert f"`{option.name}`" in page
    model_k = next(o for o in sections["model"] if o.name == "model.K")
    assert (model_k.type, model_k.default, model_k.auto, model_k.comment) == ("int", 4096, True, "queue size")
    sync_bn = next(o for o in sections["model"] if o.name == "model.sync_bn")
    assert sync_bn.comment.endswith("(on: moco_v3, simclr, byol, swav; off: moco, with shuffle BN)")  # two lines
    assert next(o for o in sections["model"] if o.name == "model.method").choices[0] == "moco"


def test_the_cli_reference_lists_every_command_and_argument() -> None:
    from moco.cli import build_parser

    page = hooks.cli_reference()
    commands = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for name, parser in commands.choices.items():
        assert f"## moco {name}" in page
        for action in parser._actions:
            spelled = action.option_strings[0] if action.option_strings else action.dest
            assert f"`{spelled}`" in page or spelled == "-h", (name, spelled)
