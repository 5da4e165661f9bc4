"""Write a course copy: the repository with the "implement" exercises of
tests/exercises.md blanked, no git history, and a README section for students.

    python tests/course.py OUT_DIR                  # every implement exercise (1-9)
    python tests/course.py OUT_DIR --exercises 1,4  # only these

An exercise is the code between `# exercise N begins: ...` and `# exercise N ends` (one or
more such regions); blanking leaves the two comments and puts a `raise NotImplementedError`
between them. The copy leaves out this file, its test, and tests/test_exercises.py, which
holds lines of the reference solutions (its wrong answers are edits of them)."""

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"^( *)# exercise (\d+) (begins|ends)\b:? ?(.*)$")
LEFT_OUT = ("tests/course.py", "tests/test_course.py", "tests/test_exercises.py")
TABLE_ROW = re.compile(r"^\| (\d+) \| implement \| [^|]+ \| (.+?) \| `(test_\w+)` \|", re.M)


def regions(text):
    """[(exercise, first line, last line, indent, title)]: the lines strictly between each
    begin/end pair (0-based, end exclusive). A marker without its partner is an error."""
    found, open_ = [], None
    for i, line in enumerate(text.splitlines()):
        m = MARKER.match(line)
        if not m:
            continue
        n, kind = int(m[2]), m[3]
        if (kind == "begins") == (open_ is not None) or (kind == "ends" and open_[0] != n):
            raise ValueError(f"line {i + 1}: '# exercise {n} {kind}' without its partner; "
                             "each region needs one '# exercise N begins: ...' and one '# exercise N ends'")
        if kind == "begins":
            open_ = (n, i + 1, m[1], m[4])
        else:
            found.append((n, open_[1], i, open_[2], open_[3]))
            open_ = None
    if open_:
        raise ValueError(f"'# exercise {open_[0]} begins' has no '# exercise {open_[0]} ends'")
    return found


def blanked(text, exercises):
    """text with the regions of `exercises` replaced by a raise (what a student starts from)."""
    lines = text.splitlines(keepends=True)
    for n, first, last, indent, title in reversed(regions(text)):
        if n in exercises:
            lines[first:last] = [f'{indent}raise NotImplementedError("exercise {n}: {title} (tests/exercises.md)")\n']
    return "".join(lines)


def tracked_files(root):
    """The repository's files: `git ls-files` where there is a .git, else a walk that skips
    what .gitignore names (so a copy of a copy works too)."""
    if os.path.exists(os.path.join(root, ".git")):
        out = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, text=True, check=True).stdout
        return sorted(p for p in out.split("\0") if p and os.path.isfile(os.path.join(root, p)))
    try:
        with open(os.path.join(root, ".gitignore")) as f:
            ignored = [line.strip().rstrip("/") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        ignored = []
    skip = lambda name: name == ".git" or any(fnmatch.fnmatch(name, pattern) for pattern in ignored)  # noqa: E731
    paths = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not skip(d))
        paths += [os.path.relpath(os.path.join(folder, n), root) for n in names if not skip(n)]
    return sorted(p.replace(os.sep, "/") for p in paths)


def implement_exercises(root):
    """{exercise: (where, grading test)} from the table in tests/exercises.md."""
    with open(os.path.join(root, "tests", "exercises.md")) as f:
        return {int(n): (where, test) for n, where, test in TABLE_ROW.findall(f.read())}


def read(root, path):
    with open(os.path.join(root, path)) as f:
        return f.read()


def student_readme(chosen, table):
    rows = "".join(f"| {n} | {table[n][0]} | `python -m pytest -q tests/test_graded.py::{table[n][1]}` |\n"
                   for n in sorted(chosen))
    return f"""# Course copy

This copy of minipretrain is for the course in [`tests/exercises.md`](tests/exercises.md).
The code of these exercises is blanked: between `# exercise N begins` and `# exercise N ends`
a `raise NotImplementedError` waits for your code. The copy has no git history, so the answer
is not one `git diff` away; `git init` it to keep your own.

| exercise | where | grade it |
| --- | --- | --- |
{rows}
Every grade at once, one PASSED or FAILED line per exercise:

    python -m pytest -v tests/test_graded.py

Other tests in `tests/` call the same functions, so they fail while an exercise is open:
watch only `tests/test_graded.py`. When every grading test passes, `python -m pytest -q tests`
passes too.

"""


def write_copy(out_dir, exercises=None, root=ROOT):
    """Copy the tracked files of `root` to out_dir, with `exercises` (default: all) blanked."""
    table = implement_exercises(root)
    chosen = set(table) if exercises is None else set(exercises)
    if chosen - set(table):
        raise ValueError(f"exercise(s) {sorted(chosen - set(table))} have no code to blank; "
                         f"choose among {min(table)}-{max(table)}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} is not empty; give a new folder")
    paths = [p for p in tracked_files(root) if p not in LEFT_OUT]
    marked = {n for p in paths if p.endswith(".py") for n, *_ in regions(read(root, p))}
    if chosen - marked:
        raise ValueError(f"exercise(s) {sorted(chosen - marked)} have no '# exercise N begins' region in the code")
    for path in paths:
        target = os.path.join(out_dir, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if path.endswith(".py") or path == "README.md":
            text = blanked(read(root, path), chosen) if path.endswith(".py") else student_readme(chosen, table) + read(root, path)
            with open(target, "w") as f:
                f.write(text)
            shutil.copymode(os.path.join(root, path), target)
        else:
            shutil.copy2(os.path.join(root, path), target)
    return sorted(chosen)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="a new (or empty) folder for the copy")
    parser.add_argument("--exercises", help="comma-separated exercise numbers (default: every implement exercise)")
    args = parser.parse_args()
    try:
        chosen = None if args.exercises is None else [int(n) for n in args.exercises.split(",")]
    except ValueError:
        sys.exit(f"error: --exercises {args.exercises!r} is not a list of numbers like 1,4")
    try:
        chosen = write_copy(args.out_dir, chosen)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out_dir}: exercises {', '.join(map(str, chosen))} blanked; see its README.md")


if __name__ == "__main__":
    main()
