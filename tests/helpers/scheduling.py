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
    "test_stable_diffusion": "stable_diffusion",
    "test_stable_diffusion_runs": "stable_diffusion",
    "test_speed_switches": "test_configs",  # both resolve every experiment config (tests.helpers.configs caches)
    "test_binding": "calibrated_tiny",  # the three share calibrated_tiny_run
    "test_image_keys": "calibrated_tiny",
    "test_export": "calibrated_tiny",
}

# the groups that take more than a few seconds, longest first; the others follow in file order
LONGEST_FIRST = (
    "test_ddp", "calibrated_tiny", "learned_demo", "test_configs", "test_slurm_cluster", "test_cli",
    "test_tools_classify", "test_faults", "test_intake", "test_slurm", "test_side_by_side", "test_baselines",
    "test_speed_switches", "test_resume", "stable_diffusion", "test_results_table", "test_set_shift", "test_dit",
)  # fmt: skip


def group_of(module: str) -> str:
    return SHARED_WORKER.get(module, module)


def start_order(group: str) -> int:
    """Sort key: the long groups first, in LONGEST_FIRST's order."""
    return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)
