"""The README's examples marked ``<!-- runs -->`` run as written (a fresh namespace each), and the README links only
to files of this repository that exist."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
EXAMPLES = re.findall(r"<!-- runs -->\s*```python\n(.*?)```", TEXT, re.S)


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_example_runs(index, capsys):
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), {})


def test_links_stay_in_the_repository():
    for target in re.findall(r"\]\(([^)#]+)\)", TEXT):
        assert "://" not in target and not target.startswith(".."), target
        assert (README.parent / target).exists(), target
    for doc in (README.parent / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            assert "://" not in target and (doc.parent / target).exists(), (doc.name, target)
