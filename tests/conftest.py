"""Test-wide settings: quiet progress bars, deterministic CPU threads, `factories` importable everywhere."""

import os
import sys
from pathlib import Path

os.environ.setdefault("PUZZLE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import transformers  # noqa: E402

# Tiny test models run fastest on one thread (and stay fast when other processes load the CPU).
torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()


def pytest_report_header(config):
    """The releases under test: make test-latest / test-oldest run the same tests against other ones."""
    return f"torch {torch.__version__}, transformers {transformers.__version__}"
