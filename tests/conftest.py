import json
from pathlib import Path

import pytest

ZOO = Path(__file__).with_name("zoo_for_tests.py")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing a shared CPU (a tiny GPT-2's step measured 9x
    faster on two busy cores). What is measured does not depend on it: a rank or a child runs with its own."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mlp_spec() -> str:
    return f"{ZOO}:mlp"


@pytest.fixture(scope="session")
def gpt2_spec() -> str:
    return f"{ZOO}:tiny_gpt2"


@pytest.fixture(scope="session")
def tiny_configs(tmp_path_factory) -> dict[str, str]:
    """``configs_for_tests``' tiny GPT-2 and LLaMA as config.json paths, by name."""
    from configs_for_tests import GPT2, LLAMA

    folder = tmp_path_factory.mktemp("configs")
    paths = {}
    for name, config in (("gpt2", GPT2), ("llama", LLAMA)):
        paths[name] = str(folder / f"{name}.json")
        (folder / f"{name}.json").write_text(json.dumps(config))
    return paths
