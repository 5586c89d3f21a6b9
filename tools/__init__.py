"""What a person runs beside the CLI: `python -m tools.<name> --help`.

benchmark (make bench), bench_data (make bench-data), results_table (make results, Table 1),
slurm (make slurm-job), summary (the end of make demo)."""
