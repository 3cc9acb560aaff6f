"""README, docs and configs read by users: no paths of the machine they were written on, a README
that stays short, and links that lead somewhere. Plain text checks: no Ray, no TensorFlow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 200

# A user's machine has none of these: home and work folders, scratch and temporary files of the
# machine that produced a transcript, and the sibling `shared/` folder of the development set-up.
# System paths (/usr, /etc, /dev, /proc, /opt) are what every machine has and stay allowed;
# cluster.yaml (node paths) is not scanned. The look-behind keeps URIs (s3://bucket/home/...) out.
DEV_PATH = re.compile(
    r"(?<![\w.~/-])/(?:work|home|Users|root|mnt|scratch|workspace|Volumes|private/var|var/folders)/"
    r"|(?<![\w.~/-])/tmp/\S"
    r"|\b[A-Za-z]:\\+Users\\+"
    r"|\.\./shared\b"
)
# Reports embed their figures as base64, whose alphabet can spell `/home/` by chance.
DATA_URI = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+")
BINARY_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".ico",
    ".pdf",
    ".gz",
    ".zip",
    ".tar",
    ".parquet",
    ".h5",
    ".npz",
}


def _user_facing_files() -> list[Path]:
    files = [README]
    for folder in ("docs", "configs"):
        files += sorted(
            p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix.lower() not in BINARY_SUFFIXES
        )
    return files


def dev_paths(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that names a development machine's path."""
    text = DATA_URI.sub("data:", text)
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if DEV_PATH.search(line)]


@pytest.mark.parametrize(
    "line",
    [
        "(`[capray] extract: capray 0.1.0 from /work/main/capray`)",
        "see /home/alice/capray/outputs",
        "cd /Users/bob/src && make demo",
        "--checkpoint /tmp/ckpt_demo",
        "/root/.keras/models/inception.h5",
        "data.images=../shared/data/flickr8k-dev/images",
        r"C:\Users\carol\capray",
    ],
)
def test_development_paths_are_recognised(line: str) -> None:
    assert dev_paths(line), line


@pytest.mark.parametrize(
    "line",
    [
        "grep -o 'avx512_bf16' /proc/cpuinfo",
        "/usr/bin/java, /etc/hosts, /dev/sda1, /opt/conda",
        "caption.input=s3://my-bucket/home/photos/ work_dir=s3://b/tmp/x",
        "https://example.com/work/index.html",
        "outputs/demo/runs/demo/best, data.images=<flickr8k-dev>/images",
        "~/wheels/capray-0.1.0-py3-none-any.whl",
        "<img src='data:image/png;base64,AAAA/home/BBBB/tmp/CCCC=='>",
    ],
)
def test_relative_urls_and_system_paths_are_allowed(line: str) -> None:
    assert not dev_paths(line), line


def test_readme_docs_and_configs_name_no_development_machine_path() -> None:
    found = [
        f"{path.relative_to(REPO)}:{n}: {line[:160]}"
        for path in _user_facing_files()
        for n, line in dev_paths(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not found, "paths of a development machine (write relative paths or a <placeholder>):\n" + "\n".join(found)


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail into docs/"
    )


# --- links ------------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are code, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, numbered as GitHub numbers repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def test_slug_follows_github() -> None:
    assert slug("The demo (`make demo`, fresh clone)") == "the-demo-make-demo-fresh-clone"
    assert slug("Control plane at scale (`bench/scale.py`, issue 14)") == "control-plane-at-scale-benchscalepy-issue-14"
    assert slug("Precision and XLA") == "precision-and-xla"


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files_that_exist(path: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][\w+.-]*:", target, re.I):  # http:, https:, mailto:, s3:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{path.relative_to(REPO)}: broken links:\n" + "\n".join(broken)
