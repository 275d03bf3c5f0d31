"""The README front page and the pages under docs/: the two commands CI and new users rely on,
links that resolve, the set-up without building that registers the effect too, the picture."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

RUN_COMMAND = (
    'bash scripts/setup.sh && .venv/bin/sgp segment "${SGP_DATA:-../shared/data}/mri_brain_tumor/'
    'image.nrrd" --labels "${SGP_DATA:-../shared/data}/mri_brain_tumor/labels.nrrd" --out '
    "out/brain_tumor.seg.nrrd --scores out/brain_tumor_scores.csv --weights random --image-size 512"
)
TEST_COMMAND = "bash scripts/test.sh"


def fencedBlocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"^```\w*\n(.*?)^```", text, re.M | re.S)]


def headingAnchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings (outside code blocks)."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^#+ (.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_readme_keeps_the_two_commands_exactly():
    text = README.read_text()
    blocks = fencedBlocks(text)
    assert RUN_COMMAND in blocks and TEST_COMMAND in blocks, blocks[:3]
    # The front page stays short: the manual lives under docs/.
    assert len(text.splitlines()) < 150, len(text.splitlines())
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith(TEST_COMMAND)


def test_every_relative_link_resolves_to_a_file_and_heading():
    broken = []
    for page in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and anchor not in headingAnchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
    linked = set(re.findall(r"\]\((docs/[\w\-]+\.md)", README.read_text()))
    assert {f"docs/{p.name}" for p in DOCS} <= linked, "every docs page is linked from README"


def test_set_up_without_building_names_both_module_folders():
    """The effect registers through its own hidden module in SegmentEditorSGP/: with only
    SGPSegment/ as an additional module path the SGP effect never appears."""
    for page in (README, ROOT / "docs" / "slicer.md"):
        text = " ".join(page.read_text().split())
        part = text[text.index("Without building"):][:600]
        assert "`SGPSegment/`" in part and "`SegmentEditorSGP/`" in part, (page.name, part)
        assert "Additional module paths" in part, part


def test_readme_shows_a_committed_screenshot_with_a_caption():
    text = README.read_text()
    pictures = re.findall(r"!\[[^\]]+\]\((Resources/Screenshots/[\w\-.]+\.png)\)", text)
    assert pictures, "the README's top shows a screenshot"
    head = text[: text.index("## The two commands")]
    assert pictures[0] in head
    png = ROOT / pictures[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 400 * 1024
