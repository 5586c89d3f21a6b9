"""How `make test` spreads the test files over its two workers (pytest-xdist --dist loadgroup).

A group runs whole on one worker: a test file, or the files that share a session fixture too expensive
to build twice. The long groups start first, so that no long one starts last and leaves a worker idle;
LONGEST_FIRST lists them, longest first (measure again with `pytest --durations=0` when a group grows).
"""

# file -> the group it runs in with its partners (the fixture they share)
SHARED_WORKER = {
    "test_diffusion_classifier": "learned_demo",
    "test_out_of_distribution": "learned_demo",
    "test_report": "learned_demo",
    "test_gpu_path": "learned_demo",
    "test_outputs_unchanged": "learned_demo",
    "test_stable_diffusion": "stable_diffusion",
    "test_stable_diffusion_runs": "stable_diffusion",
    "test_speed_switches": "test_configs",  # both resolve every experiment config (tests.helpers.configs caches)
    "test_binding": "calibrated_tiny",  # the three share calibrated_tiny_run
    "test_image_keys": "calibrated_tiny",
    "test_export": "calibrated_tiny",
}

# the groups that take more than a few seconds, longest first; the others follow in file order. pytest-xdist
# keeps this order only with --no-loadscope-reorder (the Makefile passes it): by default it reorders the groups
# by their number of tests, which starts a parametrized file of quick tests before a long fixture's group.
LONGEST_FIRST = (
    "test_ddp", "learned_demo", "test_configs", "test_slurm_cluster", "test_cli", "test_tools_classify",
    "calibrated_tiny", "test_slurm", "test_side_by_side", "test_baselines", "test_faults", "stable_diffusion",
    "test_resume", "test_intake", "test_referral_and_sets", "test_docs_commands", "test_statistics", "test_dit",
    "test_explain", "test_results_table", "test_set_shift",
)  # fmt: skip


def group_of(module: str) -> str:
    return SHARED_WORKER.get(module, module)


def start_order(group: str) -> int:
    """Sort key: the long groups first, in LONGEST_FIRST's order."""
    return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)
