from pathlib import Path

import pytest

ZOO = Path(__file__).with_name("zoo_for_tests.py")


@pytest.fixture
def mlp_spec() -> str:
    return f"{ZOO}:mlp"


@pytest.fixture
def gpt2_spec() -> str:
    return f"{ZOO}:tiny_gpt2"
