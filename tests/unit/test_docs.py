"""The repository stands on its own: no file points outside it, and every docs/ page it cites exists."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    texts = {}
    for name in names:
        try:
            texts[name] = (REPO / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
    return texts


def test_no_file_points_outside_the_repository():
    outside = re.compile(r"DESIGN\.md|\.\./shared")
    found = [
        f"{name}:{text.count(chr(10), 0, m.start()) + 1}"
        for name, text in tracked_text_files().items()
        for m in outside.finditer(text)
    ]
    assert not found, f"references to files users do not have (cite docs/ instead): {found}"


def test_every_cited_docs_page_exists():
    cited = {
        (name, m.group(0))
        for name, text in tracked_text_files().items()
        for m in re.finditer(r"docs/[\w./-]+\.md", text)
    }
    docs_links = {
        (str(page.relative_to(REPO)), "docs/" + link)
        for page in (REPO / "docs").glob("*.md")
        for link in re.findall(r"\]\(([\w.-]+\.md)\)", page.read_text())
    }
    missing = sorted(f"{name} -> {path}" for name, path in cited | docs_links if not (REPO / path).is_file())
    assert not missing, f"cited pages that do not exist: {missing}"
