"""MkDocs hooks of the documentation site (``hooks:`` in ``mkdocs.yml``).

Nothing here names a module or a page that may move:

- **API reference.** The ``distillery`` package that Python finds (``importlib`` locates
  it without importing it) is walked at build time: one page per module under ``api/``,
  each a mkdocstrings ``::: distillery.<module>`` block, and an "API reference" section
  appended to the nav, nested by package. A module that is added, moved or renamed shows
  up at the next build with no edit here or in ``mkdocs.yml``.
- **The README is the home page.** ``README.md`` (the newcomer's page on GitHub) becomes
  the site's ``index.md``; its links into ``docs/`` are rewritten to the site's pages.
- **Links to files outside** ``docs/`` (``../benchmarks/results/README.md`` from a page,
  ``benchmarks/...`` from the README) work on GitHub as they are; for the site, each
  linked file is added under ``repo/`` (Markdown rendered as a page, anything else
  copied) and the link is pointed at it. A link to a file that does not exist is left as
  it is, so ``mkdocs build --strict`` fails on it.
- **Sphinx roles** in docstrings (``:func:`name```) show as the name in code on the API
  pages.
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "distillery"
API = "api"
REPO = "repo"  # where files from outside docs/ appear in the site
# [text](target) and [text](target "title"); reference-style links are not used here
LINK = re.compile(r"(?P<head>\]\()(?P<target>[^)\s]+)(?P<tail>(?:\s+\"[^\"]*\")?\))")
FENCE = re.compile(r"^(```|~~~)")
ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|exc|obj|py:\w+):(?=<code>)")

# src_uri of a page the hooks add -> the file it stands for in the repository (links in
# it are relative to that file)
_SOURCES: dict[str, Path] = {}
README = ROOT / "README.md"


# ----------------------------------------------------------------------- the package


def package_dir() -> Path:
    """The directory of the ``distillery`` package Python would import (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {PACKAGE!r} not found: install it (make setup) first")
    return Path(next(iter(spec.submodule_search_locations)))


def modules(root: Path) -> list[str]:
    """Dotted names of the package and every module under it, packages before their
    modules, private ones (``_name``) left out."""
    names = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1] == "__main__":
            continue
        if any(p.startswith("_") for p in parts):
            continue
        if not (path.parent / "__init__.py").is_file():
            continue  # a stray script in a data folder, not a module
        names.append(".".join(parts))
    return sorted(names, key=lambda n: n.split("."))


def api_uri(name: str) -> str:
    return f"{API}/{name}.md"


def api_nav(names: list[str]) -> list:
    """Nav entries nested by package: a package is a section holding its own page first."""
    tree: dict = {}
    for name in names:
        node = tree
        for part in name.split(".")[1:]:
            node = node.setdefault(part, {})
    packages = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            packages.add(".".join(parts[:i]))

    def entries(prefix: str, node: dict) -> list:
        out = []
        for part, child in node.items():
            name = f"{prefix}.{part}"
            if name in packages:
                out.append({part: [{"Overview": api_uri(name)}, *entries(name, child)]})
            else:
                out.append({part: api_uri(name)})
        return out

    return [{"Overview": f"{API}/index.md"}, {PACKAGE: api_uri(PACKAGE)},
            *entries(PACKAGE, tree)]  # fmt: skip


def api_index(names: list[str]) -> str:
    lines = [
        "# API reference",
        "",
        f"Generated from the docstrings of every module of the installed `{PACKAGE}` "
        "package at each build of this site, so it follows the code as it moves. "
        "Private names (a leading `_`) are left out.",
        "",
    ]
    for name in names:
        depth = name.count(".")
        lines.append(f"{'    ' * depth}- [`{name}`]({name}.md)")
    return "\n".join(lines) + "\n"


def api_page(name: str) -> str:
    return f"# `{name}`\n\n::: {name}\n"


# ------------------------------------------------------------------------- the hooks


def on_config(config):
    _SOURCES.clear()  # `mkdocs serve` rebuilds in the same process
    config["extra"]["api_modules"] = names = modules(package_dir())
    config["nav"] = [*(config["nav"] or []), {"API reference": api_nav(names)}]
    return config


def on_files(files: Files, config) -> Files:
    names = config["extra"]["api_modules"]
    files.append(File.generated(config, f"{API}/index.md", content=api_index(names)))
    for name in names:
        files.append(File.generated(config, api_uri(name), content=api_page(name)))
    if files.get_file_from_path("index.md") is None:
        files.append(File.generated(config, "index.md", abs_src_path=str(README)))
        _SOURCES["index.md"] = README
    # files outside docs/ that pages link to: added under repo/, transitively
    todo = [(f.src_uri, _source(f, config)) for f in files.documentation_pages()]
    while todo:
        src_uri, source = todo.pop()
        for target in _outside_targets(source):
            uri = f"{REPO}/{target.relative_to(ROOT).as_posix()}"
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(target)))
                _SOURCES[uri] = target
                if target.suffix == ".md":
                    todo.append((uri, target))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    source = _source(page.file, config)
    return _rewrite(markdown, source, page.file.src_uri, Path(config["docs_dir"]))


def on_page_content(html: str, page, config, files) -> str:
    """Docstrings name objects with Sphinx roles (``:func:`name```); the API pages show
    the name as code, without the role."""
    if page.file.src_uri.startswith(f"{API}/"):
        return ROLE.sub("", html)
    return html


# ------------------------------------------------------------------------- links


def _source(file: File, config) -> Path:
    return _SOURCES.get(file.src_uri) or Path(config["docs_dir"]) / file.src_uri


def _split(target: str) -> tuple[str, str]:
    path, _, anchor = target.partition("#")
    return path, (f"#{anchor}" if anchor else "")


def _relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")))


def _links(markdown: str):
    """Matches of inline links outside fenced code blocks."""
    fenced = False
    offset = 0
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            for m in LINK.finditer(line):
                yield offset, m
        offset += len(line)


def _outside_targets(source: Path) -> list[Path]:
    """Existing repository files outside docs/ that ``source`` links to."""
    if source.suffix != ".md" or not source.is_file():
        return []
    docs = ROOT / "docs"
    found = []
    for _, m in _links(source.read_text()):
        path, _ = _split(m["target"])
        if not path or not _relative(m["target"]):
            continue
        target = (source.parent / path).resolve()
        if target == README and _SOURCES.get("index.md") == README:
            continue  # the home page
        if target.is_file() and target.is_relative_to(ROOT) and not target.is_relative_to(docs):
            found.append(target)
    return found


def _rewrite(markdown: str, source: Path, src_uri: str, docs: Path) -> str:
    """Relative links of a page whose file is ``source`` as the site sees them from
    ``src_uri``: into docs/ -> that page, elsewhere in the repository -> its copy under
    repo/. Links that resolve to nothing are left alone (the build reports them)."""
    here = posixpath.dirname(src_uri)
    out, last = [], 0
    for offset, m in _links(markdown):
        target = m["target"]
        path, anchor = _split(target)
        if not path or not _relative(target):
            continue
        real = (source.parent / path).resolve()
        if not real.exists():
            continue
        if real == README and _SOURCES.get("index.md") == README:
            site = "index.md"
        elif real.is_relative_to(docs):
            site = real.relative_to(docs).as_posix()
        elif real.is_relative_to(ROOT):
            site = f"{REPO}/{real.relative_to(ROOT).as_posix()}"
        else:
            continue
        new = posixpath.relpath(site, here or ".") + anchor
        if new != target:
            start = offset + m.start("target")
            out += [markdown[last:start], new]
            last = offset + m.end("target")
    return "".join(out) + markdown[last:]
