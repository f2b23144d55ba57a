"""Importing the upstream packages the parity tests compare against.

Importing min-dalle runs its ``min_dalle.py``, which switches autograd off
(``torch.set_grad_enabled(False)``) and sets torch's thread count to the core count for the whole
process; :func:`import_upstream` puts both back, so that no other test runs under them.
"""
from __future__ import annotations

import pytest
import torch


def import_upstream(name: str):
    """``pytest.importorskip(name)`` without min-dalle's process-wide side effects."""
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    try:
        return pytest.importorskip(name)
    finally:
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
