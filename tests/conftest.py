import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ["ATTNFX_STRICT"] = "1"  # in tests, attnfx's own errors must surface, not fall back silently


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
