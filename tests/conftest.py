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


def check_text_conditions(model, size: int) -> torch.Tensor:
    """A text-conditioned student in eval mode: (2, 1, size, size) finite logits, deterministic, each image's map
    changed by swapping the two reports, and :func:`dusss.textseg.segment` calling it the same way; its output."""
    from dusss.textseg import segment

    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own, swapped, again = model(x, SMOKE_REPORTS), model(x, SMOKE_REPORTS[::-1]), model(x, SMOKE_REPORTS)
        assert own.shape == (2, 1, size, size) and torch.isfinite(own).all()
        assert torch.equal(own, again)  # eval mode: deterministic
        for i in range(2):  # each image's map changes with its report
            assert (own[i] - swapped[i]).abs().max() > 1e-4
        assert torch.equal(segment(model, x, SMOKE_REPORTS), own)
    return x
