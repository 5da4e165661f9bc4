"""The rule that decides what a results table may claim (bench/common.py:mark), on small
made-up tables, and that the committed tables carry its marks; how bench runs its runs."""

import os

import pytest

from bench.common import NOTE, ROOT, evals, mark, train
from test_pretrain import tiny_args

TABLE = """| run | loss | note |
| --- | --- | --- |
| low | {low} | a |
| mid | 1.08 ± 0.05 | b |
| high | **1.16** ± 0.05 | c |
"""


def test_a_resolved_difference_gets_no_common_letter_and_the_resolved_lowest_is_bold():
    marked = mark("text\n\n" + TABLE.format(low="0.90 ± 0.02") + "\nmore text\n")
    # 0.90 is resolved from both (0.08 + 0.02 < 0.18); mid and high are within spread (0.08 <= 0.05 + 0.05)
    assert "| low | **0.90** ± 0.02 (a) | a |" in marked
    assert "| mid | 1.08 ± 0.05 (b) | b |" in marked
    assert "| high | 1.16 ± 0.05 (b) | c |" in marked  # the hand-made bold is gone
    assert f"| c |\n\n{NOTE}\n\nmore text\n" in marked and "within spread" in NOTE
    assert mark(marked) == marked  # marking again changes nothing


def test_within_spread_shares_a_letter_and_nothing_is_bold():
    # low ~ mid and mid ~ high, but low and high are resolved: two groups, mid in both
    marked = mark(TABLE.format(low="1.00 ± 0.05"))
    assert "**" not in marked
    assert "| low | 1.00 ± 0.05 (a) |" in marked
    assert "| mid | 1.08 ± 0.05 (ab) |" in marked
    assert "| high | 1.16 ± 0.05 (b) |" in marked


def test_a_tie_on_the_printed_digits_is_within_spread():
    marked = mark("| run | loss |\n| --- | --- |\n| a | 2.323 ± 0.038 |\n| b | 2.363 ± 0.002 |\n")
    assert "(a) |\n| b | 2.363 ± 0.002 (a) |" in marked  # 0.040 apart, sds summing to 0.040


def test_a_table_without_spread_is_left_alone():
    one_seed = "| model | loss |\n| --- | --- |\n| a | **2.5** |\n| b | 2.6 |\n"
    prose = "| | here |\n| --- | --- |\n| x | rises to 3.3 ± 0.1 |\n| y | falls to 2.0 ± 0.1 |\n"
    assert mark(one_seed) == one_seed and mark(prose) == prose


@pytest.mark.parametrize("path", ["README.md", "bench/packing.md", "bench/meco.md", "bench/cpt.md"])
def test_the_committed_tables_are_marked(path):
    """A bold row, or a letter, that the rule does not give fails here: run
    `python bench/common.py --mark README.md bench/*.md` and reword what changed."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    assert mark(text) == text


def test_a_bench_run_is_reused_when_finished_and_trained_again_otherwise(tmp_path):
    """bench/common.py:train reuses a finished run and trains any other run in its folder
    again from the start: it passes --overwrite_out_dir, which scripts otherwise need."""
    out_dir = str(tmp_path / "run")
    train("pretrain.py", out_dir, tiny_args(out_dir, 2), 2)
    written = os.path.getmtime(tmp_path / "run" / "ckpt.pt")
    train("pretrain.py", out_dir, tiny_args(out_dir, 2), 2)
    assert os.path.getmtime(tmp_path / "run" / "ckpt.pt") == written  # reused: not trained again
    train("pretrain.py", out_dir, tiny_args(out_dir, 3), 3)  # another length: trained again, not refused
    assert [r["step"] for r in evals(out_dir)] == [3]
