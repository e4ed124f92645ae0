"""Fixtures shared by the command-line tests."""

import pytest


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh current directory: the command's relative paths land in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
