"""Fixtures: one server for the session, and the offline LLM over the same model in this process as the oracle."""

import pytest
from serverproc import serve

from dsinfer import LLM


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="session")
def llm():
    return LLM(device="cpu", dtype="float32", progress=False)
