"""The GitHub workflows cannot run here: check what they would run against this repository.

Every ``make`` target they call exists in the Makefile, every script they name exists, the
Python they set up is the README's, the requirements they install are ``requirements.txt``,
the site workflow builds with ``make site`` and deploys with the official Pages actions only
from ``main``, the test workflow runs what ``.ci/run`` runs, and the release workflow
publishes by trusted publishing with notes that ``tools/release_notes.py`` finds.
"""
from __future__ import annotations

import itertools
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
sys.path.insert(0, str(ROOT / "tools"))
import release_notes
import repo_links


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def _on(wf: dict[str, Any]) -> dict[str, Any]:
    """The triggers (YAML 1.1 reads the bare key ``on`` as True)."""
    return wf.get("on", wf.get(True)) or {}


def _steps(wf: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in wf["jobs"].values() for step in job.get("steps", [])]


def _commands(wf: dict[str, Any]) -> list[list[str]]:
    """Every shell command of the workflow's ``run`` steps, as words (line continuations joined)."""
    out = []
    for step in _steps(wf):
        script = step.get("run")
        if not script:
            continue
        script = script.replace("\\\n", " ")
        for line in script.splitlines():
            for part in re.split(r"&&|\|\||;", line.split(" #", 1)[0]):
                words = shlex.split(part.replace("${", "{"))
                if words:
                    out.append(words)
    return out


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE)}


def _readme_python() -> str:
    m = re.search(r"Python 3\.\d+\+ \((3\.\d+) on our machines\)", (ROOT / "README.md").read_text())
    assert m, "README's Prerequisites state the Python version of our machines"
    return m.group(1)


ALL = sorted(p.name for p in WORKFLOWS.glob("*.yml"))


def test_the_three_workflows_exist():
    assert {"site.yml", "test.yml", "release.yml"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_every_make_target_exists(name):
    targets = _make_targets()
    called = [w for words in _commands(_load(name)) if words[0] == "make"
              for w in words[1:] if not w.startswith("-") and "=" not in w]
    missing = sorted(set(called) - targets)
    assert not missing, f"{name} runs make targets the Makefile lacks: {missing}"


@pytest.mark.parametrize("name", ALL)
def test_every_script_exists(name):
    scripts = [w for words in _commands(_load(name)) for w in words
               if re.fullmatch(r"\.?[\w.-]+(?:/[\w.-]+)+\.(?:py|sh)|\.ci/run", w)]
    missing = [s for s in scripts if not (ROOT / s).is_file()]
    assert not missing, f"{name} runs scripts that do not exist: {missing}"


@pytest.mark.parametrize("name", ALL)
def test_python_version_is_the_readmes(name):
    wf, want = _load(name), _readme_python()
    found = [str(s["with"]["python-version"]) for s in _steps(wf)
             if str(s.get("uses", "")).startswith("actions/setup-python")]
    for job in wf["jobs"].values():
        image = job.get("container")
        image = image.get("image") if isinstance(image, dict) else image
        if image:
            m = re.fullmatch(r"python:(3\.\d+)(?:[.-].*)?", str(image))
            assert m, f"{name}: container {image!r} is not a python:X.Y image"
            found.append(m.group(1))
    uses_python = any(words[0].startswith("python") or words[0] == "make"
                      for words in _commands(wf))
    if uses_python:
        assert found, f"{name} runs Python without setting up the README's {want}"
    assert all(v == want for v in found), f"{name} sets Python {found}, the README says {want}"


@pytest.mark.parametrize("name", ALL)
def test_requirements_are_requirements_txt(name):
    files = []
    for words in _commands(_load(name)):
        for flag, value in itertools.pairwise(words):
            if flag in ("-r", "--requirement", "-c", "--constraint"):
                files.append(value)
    assert all(f == "requirements.txt" for f in files), f"{name} installs {files}"


def test_make_venv_installs_requirements_txt():
    # the workflows' `make site` / `make test` create .venv the one way the Makefile does
    assert "pip install -q -r requirements.txt" in (ROOT / "Makefile").read_text()


def test_site_workflow_builds_checks_and_deploys_main_only():
    wf = _load("site.yml")
    on = _on(wf)
    assert on["push"]["branches"] == ["main"] and "pull_request" in on
    commands = [" ".join(w) for w in _commands(wf)]
    assert "make site" in commands, "the site is built by the command of `make site`"
    assert any(c.startswith("make check-site") for c in commands)
    uses = [str(s.get("uses", "")).split("@")[0] for s in _steps(wf)]
    for action in ("actions/configure-pages", "actions/upload-pages-artifact", "actions/deploy-pages"):
        assert action in uses, action
    upload = next(s for s in _steps(wf) if str(s.get("uses", "")).startswith("actions/upload-pages"))
    assert upload["with"]["path"] == "_build/html"
    deploy = next(j for j in wf["jobs"].values()
                  if any(str(s.get("uses", "")).startswith("actions/deploy-pages") for s in j["steps"]))
    assert "pull_request" in deploy["if"] and "refs/heads/main" in deploy["if"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    # make site builds without executing, with warnings as errors (tools/build_site.py)
    site_recipe = re.search(r"^site:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert site_recipe and "tools/build_site.py\n" in site_recipe.group(1)
    assert "--execute" not in site_recipe.group(1)
    assert '"-W", "-n"' in (ROOT / "tools" / "build_site.py").read_text()


def test_test_workflow_runs_what_ci_runs():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert ci == ["make test"], ci
    wf = _load("test.yml")
    assert any(" ".join(w[:2]) == "make test" for w in _commands(wf))
    assert all(str(j["runs-on"]).startswith("ubuntu") for j in wf["jobs"].values())


def test_release_workflow_publishes_by_trusted_publishing():
    wf = _load("release.yml")
    assert _on(wf)["push"]["tags"] == ["v*"]
    publish = next(j for j in wf["jobs"].values()
                   if any(str(s.get("uses", "")).startswith("pypa/gh-action-pypi-publish")
                          for s in j["steps"]))
    assert publish["permissions"]["id-token"] == "write"
    assert not any("password" in (s.get("with") or {}) for s in publish["steps"]), "no token"
    commands = [" ".join(w) for w in _commands(wf)]
    assert any("-m build" in c for c in commands) and any("twine check" in c for c in commands)
    assert any(c.startswith("python tools/release_notes.py") for c in commands)


def test_release_notes_of_the_current_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    notes = release_notes.release_notes(version)
    assert "Part I" in notes
    assert not re.search(r"^## ", notes, re.MULTILINE)  # the section's body only


@pytest.mark.parametrize(("version", "match"), [
    ("9.9.9", r"version='9\.9\.9' but pyproject\.toml says"),
    ("v0.1.0", r"version='v0\.1\.0' is not X\.Y\.Z"),
])
def test_release_notes_refuse_a_disagreeing_version(version, match):
    with pytest.raises(ValueError, match=match):
        release_notes.release_notes(version)


def test_release_notes_need_a_changelog_section(tmp_path):
    (tmp_path / "mini").mkdir()
    (tmp_path / "mini" / "__init__.py").write_text('__version__ = "1.2.3"\n')
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1.2.3"\n')
    (tmp_path / "CHANGELOG.md").write_text("# Changelog\n\n## [1.2.2] - 2026-01-01\n\n- old\n")
    with pytest.raises(ValueError, match=r"no non-empty section for version='1\.2\.3'.*1\.2\.2"):
        release_notes.release_notes("1.2.3", tmp_path)
    assert release_notes.changelog_section("1.2.2", tmp_path) == "- old"


# ------------------------------------------------------------------ the site's address


def test_site_url_follows_the_repository_setting(tmp_path):
    assert repo_links.site_url(ROOT) == "https://mini-book.github.io/mini/"
    for url, site in [("https://github.com/Some-Owner/proj", "https://some-owner.github.io/proj/"),
                      ("https://github.com/me/me.github.io", "https://me.github.io/")]:
        (tmp_path / "_config.yml").write_text(f"repository:\n  url: {url}\n  branch: main\n")
        assert repo_links.site_url(tmp_path) == site


def test_read_online_links_and_project_urls_are_checked(tmp_path):
    for name in ("_config.yml", "README.md", "pyproject.toml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text((ROOT / "book" / "intro.md").read_text())
    (tmp_path / "labs").mkdir()
    assert repo_links.problems(tmp_path) == []
    for page in ("README.md", "book/intro.md"):
        assert repo_links.site_url(ROOT) in (ROOT / page).read_text(), f"{page}: Read online"
    config = yaml.safe_load((tmp_path / "_config.yml").read_text())
    config["repository"]["url"] = "https://github.com/elsewhere/book"
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config))
    found = repo_links.problems(tmp_path)
    assert any(f.startswith("README.md") for f in found)
    assert any(f.startswith("book/intro.md") for f in found)
    assert any("[project.urls] Homepage" in f for f in found)
    repo_links.problems(tmp_path, write=True)
    assert repo_links.problems(tmp_path) == []
    assert "https://elsewhere.github.io/book/" in (tmp_path / "README.md").read_text()
    urls = tomllib.loads((tmp_path / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Homepage"] == "https://elsewhere.github.io/book/"
    other = "A paper's own site: <https://some-lab.github.io/Paper/>, Read online elsewhere.\n"
    (tmp_path / "book" / "other.md").write_text(other)
    assert repo_links.problems(tmp_path) == [] and (tmp_path / "book" / "other.md").read_text() == other
    (tmp_path / "book" / "intro.md").write_text("# A landing page without the link\n")
    assert any("no \"Read online\" link" in f for f in repo_links.problems(tmp_path))


def test_install_lines_use_the_distribution_name():
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert name == repo_links.dist_name(ROOT) and name != "mini"
    assert repo_links.pip_line(ROOT).startswith(f'%pip install -q "{name}[labs] @ git+https://')
    readme = (ROOT / "README.md").read_text()
    assert f"Python package \\texttt{{{name}}}" in readme  # the citation
    lines = re.findall(r"pip install[^\n]*", readme + (ROOT / "book" / "intro.md").read_text())
    named = [ln for ln in lines if "@ git+" in ln or re.search(r"install \S*\"?mini", ln)]
    assert named and all(name in ln for ln in named), named
