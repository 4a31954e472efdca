"""The documentation site builds offline with every warning an error (``mkdocs build
--strict``): a broken link or anchor fails it, and the API reference holds a page for every
module of the package, with the documented classes and functions of its source."""

from __future__ import annotations

import ast
import pkgutil
import re
import shutil
from pathlib import Path

import pytest

import distillery
import processes
from distillery.config.resolvers import PROJECT_ROOT


def build(site: Path, config: Path = PROJECT_ROOT / "mkdocs.yml", check: bool = True):
    return processes.run("mkdocs", "build", "--strict", "--config-file", str(config),
                         "--site-dir", str(site), check=check, timeout=300)  # fmt: skip


def package_modules() -> dict[str, Path]:
    """Every public module of the package (pkgutil, not the site's own walk) -> its file."""
    found = {"distillery": Path(distillery.__file__)}
    for info in pkgutil.walk_packages(distillery.__path__, "distillery."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        spec = info.module_finder.find_spec(info.name)
        found[info.name] = Path(spec.origin)
    return found


def documented(path: Path) -> list[str]:
    """Public top-level classes and functions of a source file that have a docstring."""
    tree = ast.parse(path.read_text())
    return [node.name for node in tree.body
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and not node.name.startswith("_") and ast.get_docstring(node)]  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build(out)
    return out


def test_the_site_builds_strictly_with_the_readme_as_home_page(site):
    home = (site / "index.html").read_text()
    assert "What <code>make distill</code> does" in home
    for page in sorted((PROJECT_ROOT / "docs").glob("*.md")):
        assert (site / page.stem / "index.html").is_file(), page.name
    # a link from the README into docs/ points at the site's page
    assert 'href="report-card/"' in home and 'href="docs/report-card.md"' not in home
    # a file outside docs/ that a page links to is in the site too
    assert (site / "repo" / "benchmarks" / "results" / "index.html").is_file()


def test_lists_and_code_blocks_render_as_on_github(site):
    """Python-Markdown wants a blank line before a list and a fence at the list's
    indentation; GitHub does not. Where a page differs, the site shows "- " or a fence
    as text: no page may."""
    literal = re.compile(r"^\s*(<p>)?(- |\d+\. |```)")
    shown = []
    for html in sorted(site.glob("**/index.html")):
        text = html.read_text()
        article = text[text.find("<article") : text.find("</article>")]
        article = re.sub(r"<pre.*?</pre>", "", article, flags=re.DOTALL)
        shown += [f"{html.parent.name}: {line.strip()[:80]}" for line in article.splitlines()
                  if literal.match(line)]  # fmt: skip
    assert not shown, "\n".join(shown)


def test_the_api_reference_covers_every_module_and_its_docstrings(site):
    modules = package_modules()
    assert len(modules) > 50
    pages = {p.parent.name for p in (site / "api").glob("distillery*/index.html")}
    assert pages == set(modules)
    missing = []
    for name, path in modules.items():
        html = (site / "api" / name / "index.html").read_text()
        missing += [f"{name}.{obj}" for obj in documented(path) if f'id="{name}.{obj}"' not in html]
    assert not missing, f"documented in the source, absent from the API reference: {missing}"


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    """The site copied with one line added to a page: a link to a page that does not exist
    and an anchor that does not exist. Both are reported and the build fails."""
    root = tmp_path / "repo"
    shutil.copytree(PROJECT_ROOT / "docs", root / "docs")
    shutil.copy(PROJECT_ROOT / "mkdocs.yml", root)
    shutil.copy(PROJECT_ROOT / "README.md", root)
    (root / "src").symlink_to(PROJECT_ROOT / "src")
    shutil.copytree(PROJECT_ROOT / "benchmarks" / "results", root / "benchmarks" / "results",
                    ignore=shutil.ignore_patterns("*.json"))  # fmt: skip
    page = root / "docs" / "extending.md"
    page.write_text(
        page.read_text() + "\nSee [x](no-such-page.md) and [y](llm.md#no-such-heading).\n"
    )
    done = build(tmp_path / "broken", root / "mkdocs.yml", check=False)
    assert done.returncode != 0
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2, done.stderr[-3000:]  # these two and nothing else
    assert any("'no-such-page.md'" in w for w in warnings)
    assert any("'#no-such-heading'" in w for w in warnings)
