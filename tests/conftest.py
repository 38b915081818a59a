import os
import sys

import pytest
import torch

from attnfx.runtime import cache

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))  # the examples are importable in tests
os.environ["ATTNFX_STRICT"] = "1"  # in tests, attnfx's own errors must surface, not fall back silently


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with nothing compiled and every attnfx cache empty (tests count hits and misses)."""
    torch._dynamo.reset()
    cache.clear_all()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
