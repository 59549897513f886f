"""Tests use tiny models: one intra-op thread avoids OpenMP stalls (10-100x slowdowns on 2 shared cores)
and keeps CPU results deterministic. Tests never download data (FIREFLY_OFFLINE) nor apt-get it (FIREFLY_NO_APT)."""

import os
import warnings

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


# --------------------------------------------------------------------------- the fast tier
# `python -m pytest -m "not slow" -q` is the inner loop; `python -m pytest -q` (CI) runs everything. These tests
# are marked slow here, in one list, besides those carrying @pytest.mark.slow in their files (test_engine_zoo_slow.py,
# test_distributed_cli.py, test_safety.py's torchvision models). An id without "[...]" covers every parametrization.
# Every behaviour keeps at least one fast test; the comments say which.
SLOW_TESTS = (
    # the safeguard on a residual net and VGGs: it stays fast on mlp (Firefly), vgg11-bn-linear (random, net2net)
    "tests/test_safety.py::test_every_function_changing_grower_is_safe[our-resnet18-splitting-fast]",
    "tests/test_safety.py::test_every_function_changing_grower_is_safe[our-resnet18-nash]",
    "tests/test_safety.py::test_every_function_changing_grower_is_safe[our-resnet18-gradmax]",
    "tests/test_safety.py::test_every_function_changing_grower_is_safe[our-resnet18-net2net]",
    "tests/test_safety.py::test_every_function_changing_grower_is_safe[our-resnet18-random]",
    # ... and on vgg11-bn-linear for the costlier growers: random and net2net stay fast
    "tests/test_safety.py::test_every_function_changing_grower_is_safe[vgg11-bn-linear-splitting-fast]",
    "tests/test_safety.py::test_every_function_changing_grower_is_safe[vgg11-bn-linear-gradmax]",
    "tests/test_safety.py::test_every_function_changing_grower_is_safe[vgg11-bn-linear-nash]",
    "tests/test_safety.py::test_firefly_default_step_is_safe_and_predicted[our-resnet18]",
    "tests/test_safety.py::test_firefly_default_step_is_safe_and_predicted[vgg19-bn]",
    "tests/test_safety.py::test_firefly_default_step_is_safe_and_predicted[vgg11-bn-linear]",
    # subprocess CLI runs: a killed run resumes identically (test_train's resume tests stay fast), errors
    # without traceback (in-process one-line error tests stay fast), no torch import for --help (subprocesses)
    "tests/test_cli.py::test_killed_run_resumes_to_identical_result",
    "tests/test_cli.py::test_subprocess_error_has_no_traceback",
    "tests/test_newcomer.py::test_help_and_config_errors_do_not_import_torch",
    # resume from every checkpoint: resuming right after a growth ([2]) stays fast
    "tests/test_train.py::test_resume_from_any_checkpoint_matches_uninterrupted[0]",
    "tests/test_train.py::test_resume_from_any_checkpoint_matches_uninterrupted[1]",
    "tests/test_train.py::test_resume_from_any_checkpoint_matches_uninterrupted[5]",
    # search: random search's resume and DARTS stay fast
    "tests/test_search.py::test_firefly_search_resumes_after_growth_to_the_same_result",
    "tests/test_search.py::test_firefly_search_cli_end_to_end",
    # cell growth over several rounds of every kind: each kind alone and the resume stay fast
    "tests/test_cellsearch_growth.py::test_all_kinds_over_rounds_keep_the_genotype_shared_and_edges_fit_widened_cells",
    # torch.compile after growth: refusing an unusable backend stays fast
    "tests/test_precision.py::test_compiled_model_is_recompiled_after_growth_and_matches_eager",
    # cell search resumed after growing wider and new cells: random search's resume and each kind alone stay fast
    "tests/test_cellsearch_growth.py::test_search_with_wider_and_new_cells_resumes_to_the_same_result",
    # DDP: a killed rank resumed with another process count; two ranks matching one process stays fast
    "tests/test_distributed.py::test_kill_one_rank_then_resume_with_another_process_count",
    # a grown stage's new units exact at zero amplitude: the splits-exact test of the same stage stays fast
    "tests/test_depth_growth.py::test_stage_with_an_inserted_block_gets_new_units_exactly_at_zero_amplitude",
    # Firefly cell growth lowering the loss: the score = finite difference test stays fast
    "tests/test_darts.py::test_firefly_cell_growth_keeps_best_edges_and_lowers_the_loss",
    # Lightning DDP: two processes started by Lightning (~30 s); the single-process Lightning tests stay fast
    "tests/test_integration_lightning.py::test_ddp_two_cpu_processes_grow_identically",
    # your own model by import path from the command line (subprocesses: train, resume, export, inspect); the
    # in-process import-path tests stay fast
    "tests/test_own_model.py::test_cli_trains_grows_and_exports_a_model_named_by_import_path",
    "tests/test_own_model.py::test_a_run_of_an_import_path_model_resumes_to_the_same_weights",
    "tests/test_own_model.py::test_inspect_elsewhere_is_one_line_and_a_closed_pipe_is_no_traceback",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of `SLOW_TESTS` slow; warn about ids that match nothing (a renamed test would otherwise
    silently join the fast tier)."""
    listed = set(SLOW_TESTS)
    seen = set()
    for item in items:
        for key in (item.nodeid, item.nodeid.split("[", 1)[0]):
            if key in listed:
                item.add_marker(pytest.mark.slow)
                seen.add(key)
    whole_files = not config.option.keyword and not any("::" in str(a) for a in config.args)
    files = {item.nodeid.split("::", 1)[0] for item in items}
    stale = [n for n in SLOW_TESTS if n not in seen and n.split("::", 1)[0] in files]
    if whole_files and stale:
        warnings.warn(f"tests/conftest.py SLOW_TESTS names tests that do not exist: {stale}", stacklevel=1)
