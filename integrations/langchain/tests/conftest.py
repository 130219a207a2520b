import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # keep the engine modest on shared machines


def pytest_configure(config):
    # async tests (ours and langchain-tests') run under pytest-asyncio, also when pytest
    # is started from the repository root with another ini file
    config.option.asyncio_mode = "auto"
