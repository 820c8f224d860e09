# Two commands do everything on a fresh machine with Python 3.11:
#   make reproduce   set up .venv, run every notebook at the demo profile (figures/, results/, runs/)
#   make test        set up .venv, run the unit tests and the notebooks under nbval (smoke profile)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/0*.ipynb))
export MPLBACKEND := Agg
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test reproduce notebooks clean-runs

venv: $(STAMP)

# requirements-nodeps.txt holds packages whose declared dependencies we do not
# want (see docs/installation.md); they are installed with --no-deps.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: $(STAMP)
	DUSSS_PROFILE=smoke $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

# Parameterised copies go to runs/; figures/ and results/ are written by the notebooks.
reproduce: $(STAMP)
	mkdir -p runs
	set -e; for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(BIN)/papermill --cwd notebooks $$nb runs/$$(basename $$nb) -k python3; \
	done

# Refresh the committed notebooks in place at their defaults (demo profile).
notebooks: $(STAMP)
	set -e; for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 $$nb; \
	done

clean-runs:
	rm -rf runs
