# Each user-facing target installs what it needs first, so it is one command on a fresh clone.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1

.PHONY: help install lint demo test test-all bench gpu-check bench-data ood-bench shift-bench results tensorboard clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install:  ## install the pinned requirements (idempotent: pip skips what is there)
	$(PIP) install -q --root-user-action=ignore -r requirements.txt

demo: install  ## the whole product on the embedded synthetic data (CPU, <6 min): fit, calibrate, export, test, explain, reports
	rm -rf runs/demo
	@start=$$(date +%s); \
	$(PYTHON) cli.py fit --config configs/demo.yaml && \
	$(PYTHON) cli.py validate --config configs/demo.yaml --ckpt_path last && \
	$(PYTHON) -m tools.export runs/demo && \
	$(PYTHON) cli.py test --config configs/demo.yaml --ckpt_path last && \
	seconds=$$(( $$(date +%s) - start )) && \
	$(PYTHON) cli.py predict --config configs/demo.yaml --ckpt_path last --model.init_args.explain true \
		--trainer.limit_predict_batches 1 --global_batch_size 8 && \
	$(PYTHON) -m tools.summary runs/demo --seconds $$seconds

# two pytest-xdist workers, one per core; each test file runs whole on one worker (tests/conftest.py)
PYTEST_WORKERS ?= -n 2 --dist loadgroup --no-loadscope-reorder

lint: install  ## ruff: lint and formatting (pyproject.toml), as make test runs them
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: lint  ## ruff, then the test suite without tests marked slow (<9 min on 2 CPU cores)
	$(PYTHON) -m pytest -m "not slow" -q $(PYTEST_WORKERS)

test-all: lint  ## ruff, then every test, the slow ones too
	$(PYTHON) -m pytest -q $(PYTEST_WORKERS)

bench: install  ## classification speed, and forwards against agreement with N = 501 for the demo (and PneumoniaMNIST) model (~25 min on CPU)
	@test -f runs/demo/checkpoints/last.ckpt || $(MAKE) demo
	$(PYTHON) -m tools.benchmark
	$(PYTHON) -m tools.exit_curve runs/demo/checkpoints/last.ckpt --images 96 --output-dir runs/demo/exit_curve
	@if test -f runs/unet_pneumoniamnist/checkpoints/last.ckpt; then \
		$(PYTHON) -m tools.exit_curve runs/unet_pneumoniamnist/checkpoints/last.ckpt --images 128 --output-dir runs/unet_pneumoniamnist/exit_curve; \
	else echo "no PneumoniaMNIST model: python cli.py fit --config configs/unet_pneumoniamnist.yaml, then make bench, to measure it too"; fi

ood-bench: install  ## out-of-distribution refusal of the demo UNet and a ResNet-18 on shifted sets (~15 min on CPU)
	@test -f runs/demo/checkpoints/last.ckpt || $(MAKE) demo
	@test -f runs/baseline_demo/checkpoints/last.ckpt || $(PYTHON) cli.py fit --config configs/baseline_demo.yaml
	$(PYTHON) -m tools.ood_benchmark runs/demo/checkpoints/last.ckpt runs/baseline_demo/checkpoints/last.ckpt \
		--markdown ood_benchmark.md

shift-bench: install  ## does refusal see a second hospital? site shifts of PneumoniaMNIST, UNet vs ResNet-18 (~20 min on CPU)
	@test -f runs/unet_pneumoniamnist/checkpoints/last.ckpt || $(PYTHON) cli.py fit --config configs/unet_pneumoniamnist.yaml
	@test -f runs/resnet18_pneumoniamnist/checkpoints/last.ckpt || $(PYTHON) cli.py fit --config configs/resnet18_pneumoniamnist.yaml
	$(PYTHON) -m tools.shift_benchmark runs/unet_pneumoniamnist/checkpoints/last.ckpt \
		--baseline runs/resnet18_pneumoniamnist/checkpoints/last.ckpt --markdown shift_benchmark.md --cache runs/shift_benchmark_cache

gpu-check: install  ## on a GPU: paper UNet and DiT-B/4, bf16, N = 501, exit off/on: s/image, memory, FLOPs -> gpu_check.json
	$(PYTHON) -m tools.gpu_check $(GPU_CHECK_ARGS)

bench-data: install  ## images/s from the uint8 memmap cache vs JPEG decoding at 256x256
	$(PYTHON) -m tools.bench_data

results: install  ## Table 1 from every run under runs/ with test results: prints it, writes results.md and results.csv
	$(PYTHON) -m tools.results_table runs/* --markdown results.md --csv results.csv

tensorboard:  ## watch the runs under runs/
	$(PYTHON) -m tensorboard.main --logdir runs

clean:  ## remove runs and caches
	rm -rf runs .pytest_cache bench.json gpu_check.json ood_benchmark.json ood_benchmark.md shift_benchmark.json shift_benchmark.md

# make slurm-job CONFIG=configs/unet_chexpert.yaml NODES=2 GPUS=4 [TIME= PARTITION= ACCOUNT= CPUS= MEM= EXTRA="..."] > job.sbatch
NODES ?= 1
GPUS ?= 4
TIME ?= 24:00:00
.PHONY: slurm-job
slurm-job:  ## print a SLURM job script (DDP, auto-requeue) for CONFIG on NODES x GPUS: > job.sbatch
	@test -n "$(CONFIG)" || { echo "usage: make slurm-job CONFIG=configs/<experiment>.yaml NODES=2 GPUS=4 > job.sbatch" >&2; exit 2; }
	@$(PYTHON) -m tools.slurm --config "$(CONFIG)" --nodes $(NODES) --gpus-per-node $(GPUS) --time $(TIME) \
		$(if $(PARTITION),--partition $(PARTITION)) $(if $(ACCOUNT),--account $(ACCOUNT)) \
		$(if $(CPUS),--cpus-per-task $(CPUS)) $(if $(MEM),--mem $(MEM)) $(if $(EXTRA),--extra-args='$(EXTRA)')
