import os

import pytest
import torch

# Nothing in the test suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (the README's `-n auto`) the workers share the cores: torch's default of
# one thread per core in every worker oversubscribes them, and its spinning threads then slow
# everything several-fold. Each worker, and the processes its tests start, gets its share.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
    torch.set_num_threads(int(threads))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
