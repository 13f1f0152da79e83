"""The docs' links resolve: every relative link or image in README.md, docs/ and the results
READMEs points at a file or folder of the repository, and every ``#anchor`` at a heading of
the target markdown file (GitHub's slugs). External links are not fetched (the test machines
are offline) but must be well-formed http(s) URLs. README.md stays the short front door."""

from __future__ import annotations

import posixpath
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent

SETUP = (
    "# speccore\n\n```bash\n"
    "bash scripts/demo.sh    # installs into .venv, runs STAFF on the shipped DialogSum sample"
    " → runs/demo/\n"
    "bash scripts/test.sh    # installs into .venv, runs the test suite\n"
    "```\n"
)
README_MAX_LINES = 150

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); one level of nested brackets in the text
_INLINE = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
)
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HTML = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str, blank_code: bool = True) -> Iterable[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked if asked."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            continue
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            continue
        yield number, _CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line) if blank_code else line


def links(text: str) -> list[tuple[int, str]]:
    """Every link and image target of a markdown text, with its line number."""
    found = []
    for number, line in _prose_lines(text):
        for pattern in (_INLINE, _REFERENCE, _HTML):
            for m in pattern.finditer(line):
                found.append((number, m.group(1).strip("<>")))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation dropped
    (letters, marks, digits, '_', '-' and spaces stay), spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    kept = (
        c
        for c in text.strip().lower()
        if c in " -_" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"
    )
    return "".join(kept).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a markdown file's headings (a repeated slug gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(text, blank_code=False):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _external_problem(target: str) -> str | None:
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https"):
        return f"unsupported scheme {parts.scheme!r}"
    if not parts.netloc or "." not in parts.netloc or re.search(r"\s", target):
        return "malformed URL"
    return None


def broken_links(
    docs: Mapping[str, str],
    exists: Callable[[str], bool],
    read_markdown: Callable[[str], str | None],
) -> list[str]:
    """Problems with the links of ``docs`` (repository-relative path → markdown text).

    ``exists(path)`` says whether a repository-relative path is a file or folder;
    ``read_markdown(path)`` gives a markdown file's text (None if it is not one).
    """
    problems = []
    for source, text in docs.items():
        for number, target in links(text):
            where = f"{source}:{number}: {target}"
            if target.startswith("mailto:"):
                continue
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                problem = _external_problem(target)
                if problem:
                    problems.append(f"{where}: {problem}")
                continue
            path_part, _, fragment = target.partition("#")
            path_part = unquote(path_part)
            if path_part.startswith("/"):
                problems.append(f"{where}: absolute path (GitHub resolves it elsewhere)")
                continue
            if path_part:
                resolved = posixpath.normpath(
                    posixpath.join(posixpath.dirname(source), path_part.rstrip("/"))
                )
                if resolved == ".." or resolved.startswith("../"):
                    problems.append(f"{where}: outside the repository")
                    continue
                if not exists(resolved):
                    problems.append(f"{where}: no such file or folder ({resolved})")
                    continue
            else:
                resolved = source
            if fragment:
                target_text = read_markdown(resolved)
                if target_text is None:
                    problems.append(f"{where}: anchor into a file that is not markdown")
                elif unquote(fragment) not in anchors(target_text):
                    problems.append(f"{where}: no heading #{fragment} in {resolved}")
    return problems


def repo_docs() -> dict[str, str]:
    """README.md, docs/**.md and the benches' READMEs."""
    paths = [ROOT / "README.md", ROOT / "speed-bench" / "README.md", ROOT / "demo" / "README.md"]
    paths += sorted((ROOT / "docs").rglob("*.md"))
    paths += sorted((ROOT / "quality-bench" / "results").rglob("README.md"))
    return {
        p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in paths if p.is_file()
    }


def _exists(path: str) -> bool:
    return (ROOT / path).exists()


def _read_markdown(path: str) -> str | None:
    p = ROOT / path
    return p.read_text(encoding="utf-8") if p.suffix == ".md" and p.is_file() else None


def test_docs_links_resolve() -> None:
    docs = repo_docs()
    assert "README.md" in docs and any(k.startswith("docs/") for k in docs)
    problems = broken_links(docs, _exists, _read_markdown)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_the_front_door() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count("\n") <= README_MAX_LINES, f"README.md: {text.count(chr(10))} lines"
    assert text.startswith(SETUP), "README.md must open with the two set-up commands"


def test_docs_index_lists_every_page() -> None:
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    targets = {posixpath.normpath(t.partition("#")[0]) for _, t in links(index)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= targets, f"docs/README.md does not link {sorted(pages - targets)}"


# The checker itself, on a tiny in-memory repository.

FILES = {
    "README.md": "# Top\n\nSee [the guide](docs/guide.md#set-up-v2) and [gone](docs/missing.md).\n"
    "![plot](docs/img.png) [bad anchor](docs/guide.md#nowhere) [self](#top)\n"
    "`[not a link](nowhere.md)`\n\n```md\n[also not](nowhere.md)\n```\n"
    "[web](https://example.org/a#b) [bad web](https:/example) [folder](docs/)\n",
    "docs/guide.md": "# Guide\n\n## Set-up (v2)\n\n## `--token-keep` and Δ vs random\n\n"
    "## Set-up (v2)\n\n[back](../README.md#top) [out](../../x.md) [dup](#set-up-v2-1)\n"
    "[code](#--token-keep-and-δ-vs-random)\n",
    "docs/img.png": "",
}


def _mem_exists(path: str) -> bool:
    return path in FILES or any(f.startswith(path + "/") for f in FILES)


def _mem_read(path: str) -> str | None:
    return FILES.get(path) if path.endswith(".md") else None


def test_checker_finds_broken_links_and_anchors() -> None:
    problems = broken_links(
        {k: v for k, v in FILES.items() if k.endswith(".md")}, _mem_exists, _mem_read
    )
    assert len(problems) == 4, problems
    assert any("docs/missing.md" in p and "no such file" in p for p in problems)
    assert any("#nowhere" in p and "no heading" in p for p in problems)
    assert any("https:/example" in p and "malformed" in p for p in problems)
    assert any("../../x.md" in p and "outside" in p for p in problems)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Set-up (v2)", "set-up-v2"),
        ("`--token-keep` and Δ vs random", "--token-keep-and-δ-vs-random"),
        ("What speccore does", "what-speccore-does"),
        ("STAFF vs GraNd: 0.58 on one H200", "staff-vs-grand-058-on-one-h200"),
        ("[Linked](x.md) heading_name", "linked-heading_name"),
    ],
)
def test_slug_follows_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_links_skip_code() -> None:
    text = "a `[x](y.md)` b\n```\n[z](w.md)\n```\n[k](v.md)\n"
    assert links(text) == [(5, "v.md")]
