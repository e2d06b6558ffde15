#!/usr/bin/env bash
# Prepare, here, what bench/gpu_check.sh needs on a lent GPU machine, which has no network (../.library/device):
#   .whl/          wheels (x86-64, CPython 3.12) of the locked packages the sft/pm path imports that the machine's
#                  image lacks: the list below is what a smoke sft + pm + generation run imports here (sys.modules
#                  mapped to distributions), less the image's package list (../.library/device/KINDS.md)
#   .gpu/smollm2/  SmolLM2-135M's config.json and tokenizer, from data/models/policy (built by `dvc repro models`)
# Both are git-ignored; pass them as `carry: [".whl", ".gpu"]`. Prints what travels, which must stay under 64 MiB with
# the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."

NEEDED="antlr4-python3-runtime atpublic configobj datasets dill diskcache dpath dulwich dvc dvc-data dvc-http
dvc-objects dvc-render dvc-studio-client dvclive flatten-dict flufl-lock funcy httpcore2 httpx2 hydra-core multiprocess
omegaconf orjson platformdirs polars polars-runtime-32 pydot pygtrie ruamel-yaml scmrepo sqltrie trl truststore
voluptuous wcwidth zc-lockfile"

# The locked versions (uv.lock), so the device runs what the tests here run.
locked="$(uv export --no-hashes --no-emit-project --format requirements-txt | sed 's/ *;.*//')"
pins=()
for name in $NEEDED; do
  pin="$(grep -i -E "^${name//-/[-_.]}==" <<<"$locked" || true)"
  [ -n "$pin" ] || { echo "gpu_prepare: $name is not in uv.lock" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
binary=() source=()
for pin in "${pins[@]}"; do
  case "$pin" in antlr4-python3-runtime==*) source+=("$pin") ;; *) binary+=("$pin") ;; esac # 4.9.3: sdist only
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${binary[@]}"
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl "${source[@]}"

[ -f data/models/policy/config.json ] || uv run dvc repro models
rm -rf .gpu && mkdir -p .gpu/smollm2
for f in data/models/policy/*; do
  case "$(basename "$f")" in *.safetensors) ;; *) cp "$f" .gpu/smollm2/ ;; esac
done
# What travels: the working tree (tracked and untracked-not-ignored files) and the two carried folders.
tree=$({ git ls-files; git ls-files --others --exclude-standard; } | sort -u | xargs -d '\n' du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -scb .whl .gpu | tail -1 | cut -f1)
total=$((tree + carried))
echo "travels: $((total / 1048576)) MiB ($((tree / 1024)) KiB working tree, $((carried / 1048576)) MiB carried; limit 64 MiB)"
if [ "$total" -ge $((64 * 1048576)) ]; then
  echo "gpu_prepare: over the device tool's 64 MiB; leave untracked files out of the tree" >&2
  exit 1
fi
echo "carry: [\".whl\", \".gpu\"]; command: bash bench/gpu_check.sh"
