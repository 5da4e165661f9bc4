"""The gradability check of tests/exercises.md: every "implement" exercise is graded by
a test that fails when the exercise is not done.

For each exercise, copies of its function with the exercise undone take the real one's
place, in this process, and the grading tests of tests/test_graded.py run:
- a body that raises NotImplementedError (what a student starts from): exactly the
  exercise's own grading test must fail, every other one must pass;
- wrong but well-shaped answers a student might write (a line of the real source
  deleted or miswritten, or a whole wrong function): the exercise's test must fail. A
  copy of the real source with the line left as it is must pass, so the failure comes
  from the edit.
With the real code every grading test passes.

If you edit a function that an exercise uses and a line quoted below is no longer in it,
its check fails and names the line: update the exercise in tests/exercises.md and the
line here together.
"""

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

EXERCISES_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exercises.md")


def blank(*args, **kwargs):
    """The body a student starts from."""
    raise NotImplementedError


def edited(owner, name, old, new):
    """A copy of owner.name with the line `old` of its source replaced by `new`, compiled
    in the function's own module (so it sees the same globals as the real one)."""
    function = inspect.getattr_static(owner, name)
    source = textwrap.dedent(inspect.getsource(function))
    found = source.count(old)
    assert found == 1, (f"the exercise's line {old!r} is {'not' if found == 0 else 'more than once'} in "
                        f"{owner.__name__}.{name}; update tests/exercises.md and tests/test_exercises.py")
    namespace = {}
    exec(compile(source.replace(old, new), f"<{name}, exercise undone>", "exec"),
         sys.modules[function.__module__].__dict__, namespace)
    return namespace[name]


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


# exercise: (its grading test in test_graded.py, [(what is swapped in, owner, name, how), ...])
# `how` is a function (the wrong answer itself) or (old line, new line) for edited().
EXERCISES = {
    "flash_forward": ("test_flash_forward", [
        ("blank", model, "flash_forward", blank),
        ("no rescale by alpha", model, "flash_forward",
         ("alpha = torch.exp2(m - m_safe)", "alpha = torch.ones_like(m)")),
        ("no guard for fully masked rows", model, "flash_forward",
         ("m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)", "m_safe = m_new")),
    ]),
    "flash_backward": ("test_flash_backward", [
        ("blank", model, "flash_backward", blank),
        ("dS without delta", model, "flash_backward",
         ("dS = P * (dP - delta[b, :, m0:m1, None])", "dS = P * dP")),
    ]),
    "key_tile_range": ("test_key_tile_range", [
        ("blank", model, "key_tile_range", blank),
        ("no document skipping", model, "key_tile_range",
         ("n_start = doc_start(docs, m0) // block_n * block_n", "n_start = 0")),
        ("start not on a tile boundary", model, "key_tile_range",
         ("n_start = doc_start(docs, m0) // block_n * block_n", "n_start = doc_start(docs, m0)")),
        ("diagonal tile missed", model, "key_tile_range",
         ("n_end = min(m0 + block_m, docs.numel())", "n_end = m0")),
    ]),
    "pack_best_fit": ("test_pack_best_fit", [
        ("blank", data, "pack_best_fit", blank),
        ("first fit", data, "pack_best_fit", first_fit_decreasing),
    ]),
    "positions": ("test_positions_restart_per_document", [
        ("blank", data, "rows_to_batch", blank),
        ("positions of the row", data, "rows_to_batch",
         ("pos_ids[b, t:t + n] = np.arange(n)", "pass")),
        ("positions continue across the row", data, "rows_to_batch",
         ("pos_ids[b, t:t + n] = np.arange(n)", "pos_ids[b, t:t + n] = np.arange(t, t + n)")),
    ]),
    "no_loss_on_metadata": ("test_no_loss_on_metadata_tokens", [
        ("blank", data.Corpus, "segment", blank),
        ("loss on the prefix", data.Corpus, "segment", ("targets[in_prefix[1:]] = -1", "pass")),
        ("inputs' positions masked, not the targets'", data.Corpus, "segment",
         ("targets[in_prefix[1:]] = -1", "targets[in_prefix[:-1]] = -1")),
    ]),
    "meco_cooldown": ("test_meco_cooldown", [
        ("blank", pretrain, "uses_metadata", blank),
        ("no cooldown", pretrain, "uses_metadata",
         ("return step < cooldown_start(max_steps, meta_cooldown)", "return True")),
        ("one step late", pretrain, "uses_metadata",
         ("return step < cooldown_start(max_steps, meta_cooldown)",
          "return step <= cooldown_start(max_steps, meta_cooldown)")),
    ]),
    "sum_replayed": ("test_replay_count", [
        ("blank", cpt, "sum_replayed", blank),
        ("rounded per batch", cpt, "sum_replayed", replay_by_rounding),
    ]),
    "rewarm": ("test_rewarm_schedule", [
        ("blank learning_rate", pretrain, "learning_rate", blank),
        ("warmup from 0", pretrain, "learning_rate",
         ("return start_lr + (max_lr - start_lr) * (step + 1) / warmup", "return max_lr * (step + 1) / warmup")),
        ("blank lr_schedule", cpt, "lr_schedule", blank),
        ("rewarm from 0", cpt, "lr_schedule", ("start_lr=min_lr", "start_lr=0.0")),
    ]),
}

GRADING_TESTS = sorted(name for name in dir(test_graded) if name.startswith("test_"))


def failing_grading_tests(names=GRADING_TESTS):
    """Run grading tests here, in this process; return the names of those that fail."""
    failed = []
    for name in names:
        try:
            getattr(test_graded, name)()
        except (Exception, pytest.fail.Exception):
            failed.append(name)
    return failed


def test_every_grading_test_belongs_to_one_exercise():
    assert sorted(test for test, _ in EXERCISES.values()) == GRADING_TESTS


def test_every_grading_test_passes_with_the_real_code():
    assert failing_grading_tests() == []


@pytest.mark.parametrize("exercise", EXERCISES)
def test_exercise_undone_fails_its_own_test(exercise, monkeypatch):
    """A blanked function fails its own grading test and no other one (what a student
    sees); each wrong answer fails the exercise's test (the test is strict enough)."""
    test, variants = EXERCISES[exercise]
    for label, owner, name, how in variants:
        if not callable(how):  # an edit: the same copy without the edit must pass
            with monkeypatch.context() as patch:
                patch.setattr(owner, name, edited(owner, name, how[0], how[0]))
                assert failing_grading_tests([test]) == [], f"{exercise}: the unedited copy of {name} fails"
        wrong = how if callable(how) else edited(owner, name, *how)
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, wrong)
            failed = failing_grading_tests(GRADING_TESTS if wrong is blank else [test])
        assert failed == [test], (f"{exercise}, {label} ({owner.__name__}.{name} swapped): expected "
                                  f"{test} to fail{' and no other' if wrong is blank else ''}, got {failed or 'none'}")


def test_exercises_md_names_every_grading_test():
    """Each exercise in exercises.md says how to run its grading test, by its exact name."""
    with open(EXERCISES_MD) as f:
        named = re.findall(r"python -m pytest -q tests/test_graded\.py::(\w+)", f.read())
    assert sorted(named) == GRADING_TESTS  # each one once

