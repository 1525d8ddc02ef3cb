"""Numbers come from files: the committed pages agree with their JSON, and the study readings quote
only their studies' numbers (docs/hooks/results.py).

Each check is also shown to fail: on a copy of a page with one number changed by hand.
"""

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("results_hook", ROOT / "docs" / "hooks" / "results.py")
results = importlib.util.module_from_spec(spec)
sys.modules["results_hook"] = results
spec.loader.exec_module(results)

PAGES = results.pages()
STUDIES = results.study_folders()


def test_there_are_result_pages_and_studies():
    assert PAGES, "no page under docs/ renders a result file"
    assert {f.name for f in STUDIES} >= {"study-cpu", "study-cpu-rotated", "study-steerable", "study-blur",
                                         "study-context", "study-small"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_committed_page_agrees_with_its_json(page):
    assert not results.block_problems(page), "run: python docs/hooks/results.py --write"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_a_page_quoting_timings_says_they_move(page):
    assert "Training numbers move across CPUs" in page.read_text()


@pytest.mark.parametrize("folder", STUDIES, ids=lambda f: f.name)
def test_every_number_of_a_reading_is_the_studys(folder):
    assert not results.reading_problems(folder, results.READING_EXEMPT.get(folder.name))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_every_number_of_a_benchmark_reading_is_on_its_page(page):
    assert not results.page_reading_problems(page)


def test_a_benchmark_reading_with_a_number_not_on_its_page_fails(tmp_path):
    """A reading may quote the page's rendered numbers to their rounding, and nothing else."""
    page = tmp_path / "x.md"
    page.write_text("| a | 0.8765 | 2.51 |\n\n## Reading\n\nIt reached 0.877, 2.5x faster over 3 seeds.\n")
    assert not results.page_reading_problems(page)
    page.write_text("| a | 0.8765 | 2.51 |\n\n## Reading\n\nIt reached 0.879, 2.5x faster.\n")
    assert results.page_reading_problems(page) == ["x.md:5: '0.879' is not among the page's result numbers"]


def test_the_exemptions_are_all_needed():
    """An exemption for a number that the files hold, or that the reading no longer writes, goes."""
    for name, exempt in results.READING_EXEMPT.items():
        folder = ROOT / "docs" / name
        for written in exempt:
            others = {k: v for k, v in exempt.items() if k != written}
            assert results.reading_problems(folder, others), f"{name}: {written!r} needs no exemption"


def _result_file(tmp_path: Path) -> Path:
    data = {"environment": {"machine": {"cpu": "AMD EPYC", "cores": 2, "torch_threads": 2}, "date": "2026-12-06T07:00:00Z",
                            "python": "3.11.7", "torch": "2.13.0+cpu", "equiseg": "0.1.0", "commit": "abc1234",
                            "src_changed": False, "command": "python benchmarks/x.py --size 64"},
            "tables": {"t": {"columns": [{"key": "name", "label": "layer", "format": ""},
                                         {"key": "s", "label": "seconds", "format": ".3f"},
                                         {"key": "x", "label": "x plain", "format": ".2f"}],
                             "rows": [{"name": "plain", "s": 0.1234, "x": 1.0}, {"name": "p4m", "s": 0.5, "x": None}]}}}
    (tmp_path / "x.json").write_text(json.dumps(data))
    return tmp_path / "x.json"


def test_a_block_is_rendered_from_its_file(tmp_path):
    _result_file(tmp_path)
    page = tmp_path / "x.md"
    page.write_text("Text.\n\n<!-- results: x.json t -->\nstale\n<!-- end results -->\n\n"
                    "<!-- results: x.json environment -->\n<!-- end results -->\n"
                    "<!-- results: x.json command -->\n<!-- end results -->\n")
    assert results.block_problems(page)
    page.write_text(results.render_blocks(page.read_text(), tmp_path))
    text = page.read_text()
    assert "| plain | 0.123 | 1.00 |" in text and "| p4m | 0.500 |  |" in text
    assert "Measured 2026-12-06 on AMD EPYC, 2 cores (2 torch threads); Python 3.11.7" in text
    assert "```bash\npython benchmarks/x.py --size 64\n```" in text
    assert not results.block_problems(page)


def test_a_number_changed_by_hand_in_a_page_fails(tmp_path):
    page = PAGES[0]
    shutil.copytree(page.parent, tmp_path, dirs_exist_ok=True)
    copy = tmp_path / page.name
    text = copy.read_text()
    number = next(m for block in results.BLOCK.finditer(text) if (m := re.search(r"\| (\d+\.\d+) \|", block["body"])))
    changed = number[1][:-1] + ("1" if number[1][-1] != "1" else "2")
    copy.write_text(text.replace(number[0], f"| {changed} |", 1))
    assert results.block_problems(copy)


def test_a_missing_result_file_fails(tmp_path):
    page = tmp_path / "x.md"
    page.write_text("<!-- results: nothing.json t -->\n<!-- end results -->\n")
    assert "no such result file" in results.block_problems(page)[0]


def test_a_number_changed_by_hand_in_a_reading_fails(tmp_path):
    folder = tmp_path / "study-cpu"
    shutil.copytree(ROOT / "docs" / "study-cpu", folder)
    readme = folder / "README.md"
    text = readme.read_text()
    assert "+0.091 mF1 [+0.022, +0.159]" in text
    readme.write_text(text.replace("+0.091 mF1 [+0.022, +0.159]", "+0.097 mF1 [+0.022, +0.159]"))
    assert results.reading_problems(folder) == [(f"study-cpu/README.md:{_line(text, '+0.091')}: '+0.097' is not "
                                                "among the study's numbers")]


def _line(text: str, needle: str) -> int:
    return text[:text.index(needle)].count("\n") + 1


@pytest.mark.parametrize(("written", "value", "half"), [
    ("0.091", 0.091, 0.0005), ("+0.153", 0.153, 0.0005), ("1.4e-6", 1.4e-6, 0.5e-7), ("17 %", 0.17, 0.005),
    ("61,075", 61075, 0.5), ("3e-3", 0.003, 0.0005)])
def test_numbers_are_read_with_their_rounding(written, value, half):
    [(text, v, h, _)] = results.numbers_in(f"a {written} b")
    assert text == written and v == pytest.approx(value) and h == pytest.approx(half)


def test_names_dates_code_and_angles_are_not_numbers():
    text = "p4m and c8 at 45°, D4, F1 (Liem, 2025), 2026-11-27 at 15:26, commit 1994c70, `--size 256`, 61-68 thousand"
    assert [n for n, *_ in results.numbers_in(text)] == ["61", "68 thousand"]
    assert [v for _, v, *_ in results.numbers_in(text)] == [61000, 68000]
