"""Fixtures shared by several test modules."""
import pytest
import torch

from dusss.config import make_config
from dusss.vlm import DuSSSVLM

# two QaTa-grammar reports that differ in side, count and zones
SMOKE_REPORTS = [
    "Unilateral pulmonary infection, one infected area, upper left lung.",
    "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung.",
]


@pytest.fixture(scope="module")
def smoke_vlm() -> DuSSSVLM:
    """A seeded, randomly initialised smoke-profile DuSSS VLM in eval mode (one per test module)."""
    torch.manual_seed(0)
    return DuSSSVLM.from_config(make_config("smoke")).eval()
