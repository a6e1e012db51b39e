# Quickstart targets. Each one does its own set-up on a fresh machine:
#   make demo        balance a long-tailed Fashion-MNIST split with the shipped generator
#   make test        run the test suite
#   make train-demo  train a small generator on Fashion-MNIST and write samples
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_OUT ?= demo_out

.PHONY: setup data demo train-demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=64"
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

demo: setup data
	$(PY) -m dkgm_aug.demo --out $(DEMO_OUT)

train-demo: setup data
	$(PY) -m dkgm_aug.cli train --data fashion-mnist --preset tiny --limit 10000 \
		--stage1-steps 400 --stage2-steps 150 --batch-size 32 --save-every 200 \
		--work-dir $(DEMO_OUT)/run --out $(DEMO_OUT)/fashion-mnist-demo.safetensors
	$(PY) -m dkgm_aug.cli sample $(DEMO_OUT)/fashion-mnist-demo.safetensors --data fashion-mnist \
		--n 8 --k 4 --out $(DEMO_OUT)/samples.png

test: setup data
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
