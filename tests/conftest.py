"""Tests use tiny models: one intra-op thread avoids OpenMP stalls (10-100x slowdowns on 2 shared cores)
and keeps CPU results deterministic."""

import torch

torch.set_num_threads(1)
