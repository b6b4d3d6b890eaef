"""The session check of tests/conftest.py sees files a test run adds or changes in a checkout."""
import subprocess

import pytest

from .conftest import changed_paths, checkout_state


def test_new_and_changed_files_are_seen(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    try:
        subprocess.run(git[:3] + ["init", "-q"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (tmp_path / "tracked.txt").write_text("a")
    (tmp_path / "edited.txt").write_text("x")
    subprocess.run(git + ["add", "."], check=True, capture_output=True)
    subprocess.run(git + ["commit", "-q", "-m", "init"], check=True, capture_output=True)
    (tmp_path / "edited.txt").write_text("y")  # changed before the "session"
    before = checkout_state(str(tmp_path))
    assert changed_paths(before, checkout_state(str(tmp_path))) == []
    (tmp_path / "matches.json").write_text("{}")
    (tmp_path / "edited.txt").write_text("z")  # changed again during it
    assert changed_paths(before, checkout_state(str(tmp_path))) == [" M edited.txt", "?? matches.json"]
    (tmp_path / "tracked.txt").unlink()  # a test deleting a tracked file
    assert " D tracked.txt" in changed_paths(before, checkout_state(str(tmp_path)))
    assert checkout_state(str(tmp_path / "missing")) is None  # not a checkout: nothing to compare
