"""Tests use tiny models: one intra-op thread avoids OpenMP stalls (10-100x slowdowns on 2 shared cores)
and keeps CPU results deterministic. Tests never download data (FIREFLY_OFFLINE) nor apt-get it (FIREFLY_NO_APT)."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("FIREFLY_OFFLINE", "1")
os.environ.setdefault("FIREFLY_NO_APT", "1")


@pytest.fixture()
def raw_plans(monkeypatch):
    """Growers apply their plans as they decided them: no after-apply safeguard (no BatchNorm refresh, no
    check, amplitude kept). For tests of a method's own decision; the safeguard has tests/test_safety.py."""
    from firefly_descent.methods.base import Grower
    from firefly_descent.methods.safety import Safeguard

    monkeypatch.setattr(Grower, "safeguard", Safeguard(check=False, calibrate_new_bn=False, refresh_bn=False))
