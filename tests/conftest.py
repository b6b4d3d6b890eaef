"""Session-wide check: the test run leaves the checkout as it found it.

Tests write into temporary folders (``tmp_path``), never into the repository. At the start of a
session the state of the checkout (``git status --porcelain`` and a hash of every file it lists)
is recorded; at the end, any file that appeared or changed fails the session, named.
Outside a git checkout (an sdist, an installed copy) there is nothing to compare and nothing runs.
"""
import hashlib
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STATE = pytest.StashKey()


def checkout_state(repo=REPO):
    """``{status line: content hash}`` of every changed or untracked file, or None outside git."""
    try:
        result = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=all"],
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    state = {}
    for line in result.stdout.splitlines():
        path = os.path.join(repo, line[3:].split(" -> ")[-1].strip('"'))
        digest = None
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
        state[line] = digest
    return state


def changed_paths(before, after):
    """Status lines of ``after`` that are new or whose file changed since ``before``, sorted (a
    line that went away, e.g. a change committed during the run, is not the tests' doing)."""
    return sorted(line for line in after if before.get(line, 0) != after[line])


def pytest_sessionstart(session):
    session.stash[_STATE] = checkout_state()


def pytest_sessionfinish(session, exitstatus):
    before = session.stash.get(_STATE, None)
    if before is None:
        return
    changes = changed_paths(before, checkout_state() or {})
    if changes:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the test run changed the checkout (tests must write into tmp_path):\n  " + "\n  ".join(changes)
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
