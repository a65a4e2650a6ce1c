"""PeftliteError is the library's one exception, and a ValueError."""

import pytest
from torch import nn

import peftlite


def test_is_a_value_error_raised_by_the_public_api():
    assert issubclass(peftlite.PeftliteError, ValueError)
    with pytest.raises(ValueError, match="rank=0"):
        peftlite.inject(nn.Sequential(nn.Linear(2, 2)), rank=0)
