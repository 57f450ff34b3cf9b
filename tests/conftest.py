import logging
import os
import sys

import pytest

# tests/ itself: the tests in pure/, inproc/ and processes/ import helpers.py and
# deploy_helpers.py from here
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="wse_sync")
    yield
