"""Fixtures of the bridge's peer tests."""

import pytest
from common import Daemon


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    yield d
    if d.proc.poll() is None:
        d.stop()
