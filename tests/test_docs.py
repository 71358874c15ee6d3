"""The README stays short and every relative link in it and in docs/ resolves."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(
    r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^()\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_NOT_SLUG = re.compile(r"[^\w\- ]")


def doc_files() -> list[Path]:
    """The README and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """Each line outside fenced code blocks, with its 1-based number."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker
            elif marker == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: text only, lower-case, punctuation dropped, '-' for ' '."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = _INLINE_LINK.sub(lambda m: m.group(1), text)
    text = re.sub(r"<[^>]+>", "", text)
    return _NOT_SLUG.sub("", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a page; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: set[str] = set()
    for _, line in prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        candidate, n = base, 0
        while candidate in seen:
            n += 1
            candidate = f"{base}-{n}"
        seen.add(candidate)
    return seen


def links(text: str) -> Iterator[tuple[int, str]]:
    """Each link target outside code (inline, image or reference definition), with its line."""
    for number, line in prose_lines(text):
        line = _CODE_SPAN.sub("", line)
        for match in _INLINE_LINK.finditer(line):
            yield number, match.group(2)
        definition = _REFERENCE_DEF.match(line)
        if definition:
            yield number, definition.group(1)


def broken_links(page: Path, root: Path) -> list[str]:
    """What is wrong with each relative link of one page: a missing file or anchor."""
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        if not target or _SCHEME.match(target) or target.startswith("//"):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no file {path_part}")
            continue
        if root.resolve() not in (dest, *dest.parents):
            problems.append(f"{where}: points outside the repository")
            continue
        if anchor and dest.suffix == ".md":
            if anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading #{anchor} in {dest.name}")
        elif anchor:
            problems.append(f"{where}: an anchor into a file that is not Markdown")
    return problems


def test_every_relative_link_and_anchor_resolves() -> None:
    """Every relative link in README.md and docs/*.md names a file and heading that exist."""
    problems = [p for page in doc_files() for p in broken_links(page, ROOT)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short() -> None:
    """README.md is at most 200 lines; the detail lives in docs/."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES


def test_docs_pages_have_a_title_a_summary_and_a_way_back() -> None:
    """Each docs/ page (six or more) opens with a title, a summary and a link to the README."""
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 6
    readme_text = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in pages:
        head = page.read_text(encoding="utf-8").splitlines()[:3]
        assert head[0].startswith("# "), page.name
        assert head[1] == "", page.name
        assert "](../README.md)" in head[2], page.name
        assert f"](docs/{page.name})" in readme_text, f"README does not link {page.name}"


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Options: `invite-worker run SOURCE`", "options-invite-worker-run-source"),
        ("Before, during and after a run", "before-during-and-after-a-run"),
        ("Queue mode: a Redis Stream", "queue-mode-a-redis-stream"),
        ("What 2xx/429 mean — **really**", "what-2xx429-mean--really"),
        ("The `--resume` [option](x.md)", "the---resume-option"),
        ("snake_case stays", "snake_case-stays"),
    ],
)
def test_slug_matches_github(heading: str, expected: str) -> None:
    """Heading anchors are made as GitHub makes them."""
    assert slug(heading) == expected


def test_a_broken_link_or_anchor_is_reported(tmp_path: Path) -> None:
    """A missing file, a missing anchor and a link outside the tree are each reported."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (tmp_path / "outside.md").write_text("# Outside\n", encoding="utf-8")
    (root / "docs" / "a.md").write_text("# A\n\n## Same\n\n## Same\n", encoding="utf-8")
    page = root / "README.md"
    page.write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#same-1) [ok](#top) [ok](https://example.com/x#y)\n"
        "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[gone](docs/b.md) [anchor](docs/a.md#same-2) [self](#bottom) [up](../outside.md)\n"
        "[ref]: docs/c.md\n",
        encoding="utf-8",
    )
    problems = broken_links(page, root)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/b.md: no file docs/b.md",
        "docs/a.md#same-2: no heading #same-2 in a.md",
        "#bottom: no heading #bottom in README.md",
        "../outside.md: points outside the repository",
        "docs/c.md: no file docs/c.md",
    ]


def test_every_log_event_the_code_emits_is_listed_in_running_md() -> None:
    """The list of stable event names in docs/running.md is complete: every namespaced
    event name in the package (and ``progress``) appears there, and nothing else does."""
    namespaces = ("run|batch|cli|client|emulator|enqueue|invitees|journal|metrics|plan|"
                  "preflight|prune|queue|ratelimit|reconcile|removal|report|resume|records|"
                  "sandbox|dead_letter")  # fmt: skip
    event = re.compile(rf'"((?:{namespaces})\.[a-z_]+)"')
    emitted = {"progress"}
    for path in (ROOT / "worker").rglob("*.py"):
        text = path.read_text()
        emitted |= set(event.findall(text))
    emitted.discard("ratelimit.remaining")  # a metric's name (statsd), not a log event
    running = (ROOT / "docs" / "running.md").read_text()
    section = running[running.index("Log events have stable names") : running.index("## Exit")]
    listed = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", section)) - {"--resume"}
    assert emitted - listed == set(), "emitted but not listed"
    assert listed - emitted == set(), "listed but never emitted"
