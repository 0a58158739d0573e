#!/usr/bin/env bash
# Packs, here, what the lent GPU machine lacks for jobs/gpu_check.sh: Ray (../shared/gpu/bundle.sh)
# and the pure-Python wheels qwenbatch needs that its image does not hold (pydantic) or holds at
# another version (transformers: the one this checkout is tested with). All go into .gpu/, whose
# setup.sh installs every wheel there. Then one device run, carrying .gpu:
#   source .gpu/setup.sh && jobs/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
../shared/gpu/bundle.sh
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d .gpu \
  "transformers==$(version transformers)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
du -sh .gpu
