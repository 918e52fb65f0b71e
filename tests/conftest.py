"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest

from helpers import s3server


@pytest.fixture(scope="session")
def s3_endpoint():
    """The endpoint of a real S3 server on loopback (see tests/helpers/s3server.py), with the
    standard AWS_* variables pointing at it for the whole session."""
    endpoint = s3server.existing_endpoint()
    proc = None
    if endpoint is None:
        endpoint, proc = s3server.start()
    mp = pytest.MonkeyPatch()
    for key, value in s3server.client_env(endpoint).items():
        mp.setenv(key, value)
    yield endpoint
    mp.undo()
    if proc is not None:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback server; its name (use as s3://NAME/...)."""
    return s3server.new_bucket(s3_endpoint)
