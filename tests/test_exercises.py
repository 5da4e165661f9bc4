"""The gradability check of tests/exercises.md: every "implement" exercise is graded by
a test that fails when the exercise is not done, and fails for its likely wrong answers.

An exercise is the code between `# exercise N begins: ...` and `# exercise N ends` in its
function (tests/course.py finds and blanks these regions). Copies of the function with the
exercise undone take the real one's place, in this process, and the grading tests of
tests/test_graded.py run:
- the region replaced by `raise NotImplementedError` (what a student starts from):
  exactly the exercise's own grading test must fail, every other one must pass;
- wrong answers a student might write: the exercise's test must fail. Some are whole
  functions (first fit for best fit); some edit one line of the reference solution, and a
  copy with the line left as it is must pass, so the failure comes from the edit.
The edits need the reference solution in the region. When the region holds other code
(yours, if you are doing the exercises in this repository), they skip with one line, and
the exercise's grading test alone says whether it is done.
"""

import ast
import hashlib
import inspect
import os
import re
import sys
import textwrap

import pytest

import cpt
import data
import model
import pretrain
import test_graded
from course import blanked, implement_exercises, regions

TESTS = os.path.dirname(os.path.abspath(__file__))
EXERCISES_MD = os.path.join(TESTS, "exercises.md")


def source_of(owner, name):
    return textwrap.dedent(inspect.getsource(inspect.getattr_static(owner, name)))


def compiled(owner, name, source, label):
    """The function `name` defined by `source`, compiled in owner's module (same globals)."""
    namespace = {}
    module = sys.modules[inspect.getattr_static(owner, name).__module__]
    exec(compile(source, f"<{name}, {label}>", "exec"), module.__dict__, namespace)
    return namespace[name]


def blank(owner, name):
    """owner.name with its exercise regions blanked, as tests/course.py blanks them."""
    source = source_of(owner, name)
    assert regions(source), (f"{owner.__name__}.{name} has no '# exercise N begins: ...' / '# exercise N ends' "
                             "comments; put them back around the exercise's code (see tests/exercises.md)")
    return compiled(owner, name, blanked(source, {n for n, *_ in regions(source)}), "exercise blanked")


def edited(owner, name, old, new):
    """A copy of owner.name with the line `old` of its source replaced by `new`."""
    source = source_of(owner, name)
    assert source.count(old) == 1, f"the reference line {old!r} is not once in {owner.__name__}.{name}: update it here"
    return compiled(owner, name, source.replace(old, new), "wrong answer")


def fingerprint(functions):
    """The code (not the comments or layout) in the exercise regions of these functions."""
    code = []
    for owner, name in functions:
        lines = source_of(owner, name).splitlines()
        for _, first, last, _, _ in regions("\n".join(lines)):
            body = textwrap.indent(textwrap.dedent("\n".join(lines[first:last])), "    ")
            code.append(ast.dump(ast.parse("def region():\n" + body)))
    return hashlib.sha256("".join(code).encode()).hexdigest()[:12]


def first_fit_decreasing(pieces, seq_len):
    """A plausible wrong answer to pack_best_fit: the first row that fits, not the best."""
    rows, rooms = [], []
    for piece in sorted(pieces, key=lambda p: p[1] - p[2]):
        n = piece[2] - piece[1]
        i = next((r for r, room in enumerate(rooms) if room >= n), None)
        if i is None:
            rows.append([])
            rooms.append(seq_len)
            i = len(rows) - 1
        rows[i].append(piece)
        rooms[i] -= n
    return rows


def replay_by_rounding(index, batch_size, replay):
    """A plausible wrong answer to sum_replayed: round each batch on its own."""
    return index * round(batch_size * replay)


def replay_in_floats(index, batch_size, replay):
    """A plausible wrong answer to sum_replayed: floor(index·B·r) in floats, where 0.29 of
    100 rows is 28.999999999999996."""
    return int(index * batch_size * replay)


BEST = "room = n + (fits & -fits).bit_length() - 1"
SORT = "pieces = sorted(pieces, key=lambda p: p[1] - p[2])"
COOLDOWN = "return step < cooldown_start(max_steps, meta_cooldown)"
TILE_START = "n_start = doc_start(docs, m0) // block_n * block_n"

# exercise: (its grading test, the functions holding its regions, the reference's fingerprint,
#            its wrong answers [(label, owner, name, how)]), `how` a function or (old line, new line).
EXERCISES = {
    1: ("test_flash_forward", [(model, "flash_forward")], "36028611399a", [
        ("no rescale by alpha", model, "flash_forward", ("alpha = torch.exp2(m - m_safe)", "alpha = torch.ones_like(m)")),
        ("alpha the wrong way round", model, "flash_forward",
         ("alpha = torch.exp2(m - m_safe)", "alpha = torch.exp2(m_safe - m)")),
        ("no guard for fully masked rows", model, "flash_forward",
         ("m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)", "m_safe = m_new")),
    ]),
    2: ("test_flash_backward", [(model, "flash_backward")], "fcbafda69b82", [
        ("dS without delta", model, "flash_backward", ("dS = P * (dP - delta[b, :, m0:m1, None])", "dS = P * dP")),
    ]),
    3: ("test_key_tile_range", [(model, "key_tile_range")], "97816dcd19cf", [
        ("no document skipping", model, "key_tile_range", (TILE_START, "n_start = 0")),
        ("start not on a tile boundary", model, "key_tile_range", (TILE_START, "n_start = doc_start(docs, m0)")),
        ("start on a query-tile boundary", model, "key_tile_range",
         (TILE_START, "n_start = doc_start(docs, m0) // block_m * block_m")),
        ("diagonal tile missed", model, "key_tile_range", ("n_end = min(m0 + block_m, docs.numel())", "n_end = m0")),
    ]),
    4: ("test_pack_best_fit", [(data, "pack_best_fit")], "3ee0c0f9b297", [
        ("first fit", data, "pack_best_fit", first_fit_decreasing),
        ("sorted by stop, not by length", data, "pack_best_fit", (SORT, "pieces = sorted(pieces, key=lambda p: -p[2])")),
        ("a piece's size taken as its stop", data, "pack_best_fit", ("n = piece[2] - piece[1]", "n = piece[2]")),
        ("shortest first", data, "pack_best_fit", (SORT, "pieces = sorted(pieces, key=lambda p: p[2] - p[1])")),
        ("worst fit (the most room)", data, "pack_best_fit", (BEST, "room = n + fits.bit_length() - 1")),
    ]),
    5: ("test_positions_restart_per_document", [(data, "rows_to_batch")], "4724efcfe19f", [
        ("positions of the row", data, "rows_to_batch", ("pos_ids[b, t:t + n] = np.arange(n)", "pass")),
        ("positions continue across the row", data, "rows_to_batch",
         ("pos_ids[b, t:t + n] = np.arange(n)", "pos_ids[b, t:t + n] = np.arange(t, t + n)")),
        ("positions in the document, not in the piece", data, "rows_to_batch",
         ("pos_ids[b, t:t + n] = np.arange(n)", "pos_ids[b, t:t + n] = np.arange(start, stop)")),
    ]),
    6: ("test_no_loss_on_metadata_tokens", [(data.Corpus, "segment")], "399f2862017c", [
        ("loss on the prefix", data.Corpus, "segment", ("targets[in_prefix[1:]] = -1", "pass")),
        ("inputs' positions masked, not the targets'", data.Corpus, "segment",
         ("targets[in_prefix[1:]] = -1", "targets[in_prefix[:-1]] = -1")),
        ("as if every piece started at 0", data.Corpus, "segment", ("targets[in_prefix[1:]] = -1", "targets[:p] = -1")),
    ]),
    7: ("test_meco_cooldown", [(pretrain, "uses_metadata")], "b035a99cd5ad", [
        ("no cooldown", pretrain, "uses_metadata", (COOLDOWN, "return True")),
        ("one step late", pretrain, "uses_metadata", (COOLDOWN, "return step <= cooldown_start(max_steps, meta_cooldown)")),
        ("truncated, not rounded", pretrain, "uses_metadata",
         (COOLDOWN, "return step < int((1 - meta_cooldown) * max_steps)")),
        ("compared with the unrounded step", pretrain, "uses_metadata",
         (COOLDOWN, "return step < (1 - meta_cooldown) * max_steps")),
    ]),
    8: ("test_replay_count", [(cpt, "sum_replayed")], "75b26c13c474", [
        ("rounded per batch", cpt, "sum_replayed", replay_by_rounding),
        ("the share in floats", cpt, "sum_replayed", replay_in_floats),
    ]),
    9: ("test_rewarm_schedule", [(pretrain, "learning_rate"), (cpt, "lr_schedule")], "88a90308d7e3", [
        ("warmup from 0", pretrain, "learning_rate",
         ("return start_lr + (max_lr - start_lr) * (step + 1) / warmup", "return max_lr * (step + 1) / warmup")),
        ("warmup one step late", pretrain, "learning_rate",
         ("return start_lr + (max_lr - start_lr) * (step + 1) / warmup", "return start_lr + (max_lr - start_lr) * step / warmup")),
        ("rewarm from 0", cpt, "lr_schedule", ("start_lr=min_lr", "start_lr=0.0")),
    ]),
}

GRADING_TESTS = sorted(name for name in dir(test_graded) if name.startswith("test_"))
WRONG_ANSWERS = [(n, *wrong) for n, (_, _, _, wrongs) in EXERCISES.items() for wrong in wrongs]


def failing_grading_tests(names=GRADING_TESTS):
    """Run grading tests here, in this process; return the names of those that fail."""
    failed = []
    for name in names:
        try:
            getattr(test_graded, name)()
        except (Exception, pytest.fail.Exception):
            failed.append(name)
    return failed


def skip_unless_reference(exercise):
    """Skip, with one line, where the exercise's regions hold other code than the reference."""
    test, functions, reference, _ = EXERCISES[exercise]
    found = fingerprint(functions)
    if found != reference:
        state = "done" if not failing_grading_tests([test]) else f"not done yet ({test} fails)"
        pytest.skip(f"exercise {exercise} is {state}, in your own words: its wrong answers that edit the reference "
                    f"are not checked (maintainers: a new reference solution's fingerprint is {found})")


def test_every_grading_test_belongs_to_one_exercise():
    assert sorted(test for test, *_ in EXERCISES.values()) == GRADING_TESTS
    assert {n: test for n, (_, test) in implement_exercises(os.path.dirname(TESTS)).items()} == \
        {n: test for n, (test, *_) in EXERCISES.items()}  # exercises.md's table agrees


def test_every_region_in_the_code_is_checked_here():
    """The regions tests/course.py blanks are those of the functions listed here."""
    in_files = set()
    for module in (model, data, pretrain, cpt):
        with open(module.__file__) as f:
            in_files |= {(module.__name__, n) for n, *_ in regions(f.read())}
    listed = {(inspect.getattr_static(owner, name).__module__, n)
              for n, (_, functions, _, _) in EXERCISES.items() for owner, name in functions}
    assert in_files == listed


def test_every_grading_test_passes_with_the_real_code():
    failed = failing_grading_tests()
    assert failed == [], f"{failed} fail: an exercise in progress? run python -m pytest -q tests/test_graded.py"


@pytest.mark.parametrize("exercise", EXERCISES)
def test_blanked_exercise_fails_its_own_test_only(exercise, monkeypatch):
    """What a student starts from: the region blanked fails the exercise's grading test and
    no other one (each of the exercise's functions on its own)."""
    test, functions, _, _ = EXERCISES[exercise]
    for owner, name in functions:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, blank(owner, name))
            failed = failing_grading_tests()
        assert failed == [test], f"exercise {exercise}, {name} blanked: expected only {test} to fail, got {failed or 'none'}"


@pytest.mark.parametrize("exercise, label, owner, name, how", WRONG_ANSWERS,
                         ids=[f"{n}-{label}" for n, label, *_ in WRONG_ANSWERS])
def test_wrong_answer_fails_the_grading_test(exercise, label, owner, name, how, monkeypatch):
    test = EXERCISES[exercise][0]
    if not callable(how):  # an edit of the reference: the same copy without the edit must pass
        skip_unless_reference(exercise)
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, edited(owner, name, how[0], how[0]))
            assert failing_grading_tests([test]) == [], f"exercise {exercise}: the unedited copy of {name} fails"
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, how if callable(how) else edited(owner, name, *how))
        assert failing_grading_tests([test]) == [test], f"exercise {exercise}, {label}: {test} passes"


def test_exercises_md_names_every_grading_test():
    """Each exercise in exercises.md says how to run its grading test, by its exact name."""
    with open(EXERCISES_MD) as f:
        named = re.findall(r"python -m pytest -q tests/test_graded\.py::(\w+)", f.read())
    assert sorted(named) == GRADING_TESTS  # each one once
