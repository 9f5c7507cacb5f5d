"""The README and the pages under docs/: every relative link leads somewhere, the index lists every page, and the
front page keeps the commands CI and new users run."""

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest


REPOSITORY = Path(__file__).resolve().parent.parent
README = REPOSITORY / "README.md"
DOCS = REPOSITORY / "docs"
DOCS_INDEX = DOCS / "index.md"
README_MAX_LINES = 300
TEST_COMMAND = "python -m pytest -q tests"
DEMO_COMMAND = "bash examples/demo.sh"

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
# `](target)` or `](target "title")`: the end of an inline link or image, whatever its text holds (nested images too).
_INLINE_TARGET = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
# `[label]: target`, a reference definition.
_REFERENCE_TARGET = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
_HTML_TARGET = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.IGNORECASE)
_HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_URL_SCHEME = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")


def documentation_pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _without_code_blocks(markdown: str) -> list[str]:
    """The lines outside fenced code blocks (links in code are text)."""
    kept, fence = [], None
    for line in markdown.splitlines():
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
        else:
            kept.append(line)
    return kept


def link_targets(markdown: str) -> list[str]:
    """Every link and image target of a page: inline, reference definitions and HTML `href`/`src`; not those in code
    blocks, code spans or HTML comments, which are not rendered as links."""
    text = "\n".join(_without_code_blocks(markdown))
    text = _CODE_SPAN.sub("", _HTML_COMMENT.sub("", text))
    targets = [match.group(1) for pattern in (_INLINE_TARGET, _REFERENCE_TARGET) for match in pattern.finditer(text)]
    targets += [match.group(1) for match in _HTML_TARGET.finditer(text)]
    return [target[1:-1] if target.startswith("<") else target for target in targets]


def heading_anchors(markdown: str) -> set[str]:
    """The `#anchor`s a page has, as GitHub makes them: each ATX heading lowercased, punctuation dropped, spaces to
    hyphens, `-1`, `-2`, ... after repeats; and explicit `<a id=...>` / `<a name=...>` anchors."""
    anchors, seen = set(), Counter()
    for line in _without_code_blocks(markdown):
        heading = _ATX_HEADING.match(line)
        if not heading:
            continue
        # Links and images show their text; inline code shows its content.
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    anchors.update(match.group(1) for match in _HTML_ANCHOR.finditer(markdown))
    return anchors


def broken_links(page: Path, repository: Path) -> list[str]:
    """The relative links of `page` that lead nowhere: to a path missing from `repository` (or outside it), or to an
    anchor that is not a heading of the Markdown page named. Links with a scheme (`https:`, `mailto:`) are not
    checked."""
    broken = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if _URL_SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if not path_part:
            destination = page
        elif path_part.startswith("/"):
            destination = repository / path_part.lstrip("/")
        else:
            destination = page.parent / path_part
        destination = destination.resolve()
        if not destination.is_relative_to(repository.resolve()):
            broken.append(f"{target}: outside the repository")
        elif not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and destination.is_file():
            if unquote(anchor).lower() not in heading_anchors(destination.read_text(encoding="utf-8")):
                broken.append(f"{target}: no heading #{anchor} in {destination.relative_to(repository.resolve())}")
    return broken


@pytest.mark.parametrize("page", documentation_pages(), ids=lambda page: str(page.relative_to(REPOSITORY)))
def test_relative_links_lead_somewhere(page):
    assert broken_links(page, REPOSITORY) == []


def test_link_check_reports_each_kind_of_dead_link(tmp_path):
    repository = tmp_path / "repository"
    (repository / "docs").mkdir(parents=True)
    (repository / "docs" / "guide.md").write_text(
        "# A guide\n\n## Set-up, step 1\n\n## Set-up, step 1\n\n~~~bash\n# Not a heading\n~~~\n"
    )
    (repository / "picture.png").write_bytes(b"")
    (tmp_path / "elsewhere.md").write_text("# Outside the repository\n")
    page = repository / "README.md"
    page.write_text(
        "# Front page\n\n"
        "[guide](docs/guide.md) [step](docs/guide.md#set-up-step-1) [again](docs/guide.md#set-up-step-1-1)\n"
        "[top](#front-page) [root](/docs/guide.md) ![ok](picture.png) [web](https://example.com/missing.md)\n"
        "[mail](mailto:someone@example.com) `[code span](missing-in-code.md)` <!-- [comment](missing.md) -->\n"
        "~~~\n```\n[fenced](missing-in-fence.md)\n~~~\n\n"
        "[gone](docs/gone.md) ![lost](lost.png) [no heading](docs/guide.md#set-up) [self](#nowhere)\n"
        '[![badge](badge.svg)](docs/guide.md) [titled](missing-titled.md "Title") <img src="missing.svg">\n'
        "[outside](../elsewhere.md) [code comment](docs/guide.md#not-a-heading)\n\n"
        "[ref]: docs/missing-reference.md\n"
    )
    assert broken_links(page, repository) == [
        "docs/gone.md: no such file",
        "lost.png: no such file",
        "docs/guide.md#set-up: no heading #set-up in docs/guide.md",
        "#nowhere: no heading #nowhere in README.md",
        "badge.svg: no such file",
        "missing-titled.md: no such file",
        "../elsewhere.md: outside the repository",
        "docs/guide.md#not-a-heading: no heading #not-a-heading in docs/guide.md",
        "docs/missing-reference.md: no such file",
        "missing.svg: no such file",
    ]


def test_docs_index_lists_every_page_once():
    linked = [
        (DOCS / unquote(target.partition("#")[0])).resolve()
        for target in link_targets(DOCS_INDEX.read_text(encoding="utf-8"))
        if not _URL_SCHEME.match(target) and target.partition("#")[0]
    ]
    pages = {page.resolve() for page in DOCS.rglob("*.md")} - {DOCS_INDEX.resolve()}
    assert sorted(str(page.relative_to(DOCS)) for page in pages - set(linked)) == []
    assert [page.name for page, count in Counter(linked).items() if count > 1 and page in pages] == []


def test_readme_is_a_front_page_with_the_commands_ci_and_users_run():
    readme_lines = README.read_text(encoding="utf-8").splitlines()
    assert len(readme_lines) <= README_MAX_LINES
    # CI runs the README's test command, word for word.
    assert TEST_COMMAND in readme_lines
    assert TEST_COMMAND in (REPOSITORY / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert DEMO_COMMAND in readme_lines
    assert (REPOSITORY / DEMO_COMMAND.split()[1]).is_file()
    # The five-line usage comes before the long sections.
    assert readme_lines.index("## Quickstart") < 40
