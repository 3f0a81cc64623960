"""Every link that depends on the repository URL and branch agrees with _config.yml."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import repo_links  # noqa: E402


def test_all_links_agree_with_config():
    assert repo_links.problems(ROOT) == []


def test_every_lab_has_badge_and_pip_line():
    labs = repo_links.lab_notebooks(ROOT)
    assert labs, "no lab notebooks found"
    for nb_path in labs:
        rel = nb_path.relative_to(ROOT).as_posix()
        nb = nbformat.read(nb_path, as_version=4)
        assert repo_links.badge(rel, ROOT) in nb.cells[0].source, f"{rel}: badge not in first cell"
        setup = next(c for c in nb.cells if c.cell_type == "code")
        assert repo_links.pip_line(ROOT) in setup.source, f"{rel}: first code cell lacks %pip line"
        assert '"google.colab" in sys.modules' in setup.source, f"{rel}: pip must run on Colab only"


def test_every_notebook_chapter_installs_mini_on_colab():
    chapters = repo_links.chapter_notebooks(ROOT)
    assert chapters, "no notebook chapters found"
    for nb_path in chapters:
        setup = next(c for c in nbformat.read(nb_path, as_version=4).cells if c.cell_type == "code")
        assert repo_links.pip_line(ROOT) in setup.source, f"{nb_path.name}: first code cell lacks %pip line"
        assert '"google.colab" in sys.modules' in setup.source, f"{nb_path}: pip must run on Colab only"


def test_check_detects_a_changed_setting(tmp_path):
    # A copy of the repository with a different branch: every lab and page must be flagged.
    for name in ("_config.yml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "labs", tmp_path / "labs")
    shutil.copytree(ROOT / "book", tmp_path / "book")
    config = yaml.safe_load((tmp_path / "_config.yml").read_text())
    config["repository"]["branch"] = "some-other-branch"
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config))
    found = repo_links.problems(tmp_path)
    assert any("labs/" in f for f in found)
    assert any(f.startswith("book/") and ".ipynb" in f for f in found)  # the notebook chapters
    assert any("README.md" in f for f in found)
    assert repo_links.problems(tmp_path, write=True)  # rewrites ...
    assert repo_links.problems(tmp_path) == []  # ... and then agrees


def test_bad_repository_setting_is_a_clear_error(tmp_path):
    (tmp_path / "_config.yml").write_text("repository:\n  url: not-a-url\n  branch: main\n")
    with pytest.raises(ValueError, match="repository.url"):
        repo_links.repository(tmp_path)


def test_toc_lists_only_existing_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    for f in files:
        assert any((ROOT / f).with_suffix(s).exists() for s in (".md", ".ipynb")), f
