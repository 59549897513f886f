"""Tests use tiny models: one intra-op thread avoids OpenMP stalls (10-100x slowdowns on 2 shared cores)
and keeps CPU results deterministic. Tests never download data (FIREFLY_OFFLINE) nor apt-get it (FIREFLY_NO_APT)."""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("FIREFLY_OFFLINE", "1")
os.environ.setdefault("FIREFLY_NO_APT", "1")
