"""tests/course.py: the course copy a teacher hands out. In the copy, each blanked
exercise's grading test fails and every other one passes, the rest of the code still works,
no reference solution or git history is left, and the README tells students how to grade."""

import os
import re
import subprocess
import sys

import course

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["tests/test_model.py::test_shapes_and_ignored_targets",  # the model, with none of the exercises
         "tests/test_model.py::test_packed_document_sees_exactly_what_it_sees_alone"]


def write_course_copy(out_dir, *flags):
    """The teacher's command, as a teacher runs it."""
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "course.py"), str(out_dir), *flags], check=True,
                   capture_output=True)
    return str(out_dir)


def failing_tests_in(copy, *tests):
    """Run pytest in the copy; return the ids of the tests that fail, after checking that the
    others passed (a collection error counts as a failure)."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
                         cwd=copy, capture_output=True, text=True)
    failed = sorted(re.findall(r"^(?:FAILED|ERROR) (\S+)", run.stdout, re.M))
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed[1]) + len(failed) >= len(tests), run.stdout[-3000:]
    return failed


def region_bodies(path):
    """{exercise: [the lines of each of its regions]} in a file."""
    with open(path) as f:
        lines = f.read().splitlines()
    bodies = {}
    for n, first, last, _, _ in course.regions("\n".join(lines)):
        bodies.setdefault(n, []).append(lines[first:last])
    return bodies


def test_a_copy_with_two_exercises_fails_exactly_their_grading_tests(tmp_path):
    copy = write_course_copy(tmp_path / "course", "--exercises", "1,4")
    failed = failing_tests_in(copy, "tests/test_graded.py")
    assert failed == ["tests/test_graded.py::test_flash_forward", "tests/test_graded.py::test_pack_best_fit"]
    for name in ("model.py", "data.py", "pretrain.py", "cpt.py"):  # the other exercises: as in the repository
        mine, theirs = region_bodies(os.path.join(ROOT, name)), region_bodies(os.path.join(copy, name))
        assert {n: b for n, b in theirs.items() if n not in (1, 4)} == {n: b for n, b in mine.items() if n not in (1, 4)}


def test_the_default_copy_blanks_every_exercise_and_keeps_no_answer(tmp_path):
    copy = write_course_copy(tmp_path / "course")
    implement = course.implement_exercises(ROOT)
    failed = failing_tests_in(copy, "tests/test_graded.py", *SMOKE)
    assert failed == sorted(f"tests/test_graded.py::{test}" for _, test in implement.values())  # smoke tests pass

    blanked = {}
    for name in ("model.py", "data.py", "pretrain.py", "cpt.py"):
        for n, bodies in region_bodies(os.path.join(copy, name)).items():
            assert all(len(b) == 1 and "raise NotImplementedError" in b[0] for b in bodies), (name, n, bodies)
            blanked[n] = bodies
    assert sorted(blanked) == sorted(implement)
    files = set(course.tracked_files(copy))
    assert not os.path.exists(os.path.join(copy, ".git")) and not files & set(course.LEFT_OUT)
    assert files == set(course.tracked_files(ROOT)) - set(course.LEFT_OUT)
    with open(os.path.join(copy, "README.md")) as f:
        readme = f.read()
    assert readme.startswith("# Course copy") and "python -m pytest -v tests/test_graded.py" in readme
    assert all(f"tests/test_graded.py::{test}" in readme for _, test in implement.values())  # grade one

    again = course.write_copy(str(tmp_path / "again"), root=copy)  # a copy of the copy: no .git, the walk
    assert again == sorted(implement) and set(course.tracked_files(str(tmp_path / "again"))) == files
