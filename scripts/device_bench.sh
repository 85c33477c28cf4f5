#!/usr/bin/env bash
# BENCHMARKS.md's accelerator table in one call of a lent GPU machine (README "Benchmarks on a lent GPU").
#
#   bash scripts/device_bench.sh --download   # here, once: wheels (CPython 3.12, manylinux) of the pinned
#                                             # packages a stock CUDA image lacks → .whl/ (~36 MB, git-ignored)
#   bash scripts/device_bench.sh              # there, with .whl/ beside it: install, assets, the benchmarks
#
# There it uses that machine's python3 with its own jax/jaxlib (CUDA) and torch, and installs the carried
# wheels into a private folder ahead of them (our pins of diffusers, transformers, flax, … win). It then
# writes random weights at the released shapes (python -m mtok_jax.demo.full_size, 512 px) and runs, in
# this order so that the targets of the issue come first if time runs out:
#   1. exp1, exp1-cached against PyTorch eager and torch.compile (exp1: ≥ 2× eager, ≥ 1.2× compile, MFU)
#   2. sample, exp2 against PyTorch eager (sampling ≥ 1.5× diffusers, exp2 ≥ 1.5× eager)
# each with --markdown, so BENCHMARKS.md (copied to $OUT after each stage) holds every finished figure.
# Environment: PRESET (sd14; tiny checks the script on a CPU in minutes), PYTHON (.venv/bin/python where
# there is one, else python3), OUT (results;
# default ./device_out), ASSETS (/tmp/mtok_assets), CHILD_TIMEOUT_S (300: one measurement's limit),
# MTOK_BENCH_COMMIT (the commit to record: the machine gets no .git), WHEELS (.whl).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}

if [[ "${1:-}" == "--download" ]]; then
  # Versions: requirements-lock.txt. promise has no wheel on PyPI: built here (pure Python).
  pins=(diffusers transformers huggingface_hub tokenizers flax optax orbax-checkpoint ml_collections soundfile
        soxr tensorflow-datasets array_record importlib_resources tensorboardX dm-tree immutabledict simple-parsing
        docstring_parser tensorflow-metadata googleapis-common-protos termcolor toml cffi pycparser)
  specs=()
  for name in "${pins[@]}"; do
    line=$(grep -i -E "^${name//[-_]/[-_]}==" requirements-lock.txt) || { echo "no pin of $name in requirements-lock.txt" >&2; exit 2; }
    specs+=("$line")
  done
  platforms=()
  for p in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux2014; do
    platforms+=(--platform "${p}_x86_64")
  done
  mkdir -p "$WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform any -d "$WHEELS" "${specs[@]}" || exit 1
  python3 -m pip wheel -q --no-deps -w "$WHEELS" "$(grep -i '^promise==' requirements-lock.txt)" || exit 1
  grep -qs '^/\.whl/$' .git/info/exclude || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
  du -sh "$WHEELS"
  exit 0
fi

PRESET=${PRESET:-sd14}
# here: make venv-test's .venv; on the device machine (no .venv carried): its own python3
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-$PWD/device_out}
ASSETS=${ASSETS:-/tmp/mtok_assets}
CHILD_TIMEOUT_S=${CHILD_TIMEOUT_S:-300}
mkdir -p "$OUT"
log() { echo "[device_bench $(date +%H:%M:%S)] $*" | tee -a "$OUT/bench.log"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  site=/tmp/mtok_site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$WHEELS"/*.whl 2>&1 | grep -v -i "warning" | tail -5
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

"$PYTHON" - <<'EOF' 2>&1 | tee -a "$OUT/bench.log" || exit 1
import importlib.metadata as md, jax
print("versions:", ", ".join(f"{n} {md.version(n)}" for n in ("jax", "jaxlib", "flax", "diffusers", "transformers", "torch")))
import torch, mtok_jax.system, mtok_jax.bench.torch_work  # noqa: F401 (every import the benchmarks need)
print("jax devices:", jax.devices(), "| torch cuda:", torch.cuda.is_available())
EOF

if [[ "$PRESET" == tiny ]]; then
  assets=$ASSETS  # bench writes the demo models and dataset there
else
  image_size=$("$PYTHON" -c "from mtok_jax.bench import PRESETS; print(PRESETS['$PRESET'].image_size)")
  log "assets: random weights at the released shapes, ${image_size} px → $ASSETS"
  "$PYTHON" -m mtok_jax.demo.full_size --root "$ASSETS" --image_size "$image_size" --clips_per_label 1 \
    >>"$OUT/bench.log" 2>&1 || { log "writing the assets failed (tail of $OUT/bench.log)"; tail -20 "$OUT/bench.log"; exit 1; }
  assets=$ASSETS
fi

stage() {  # stage NAME WHAT REFERENCE
  log "stage $1: --what $2 --reference $3"
  "$PYTHON" -m mtok_jax.bench --preset "$PRESET" --what "$2" --reference "$3" --runs 5 --assets "$assets" \
    --timeout_s "$CHILD_TIMEOUT_S" --markdown 2>>"$OUT/stderr.log" | tee -a "$OUT/bench.log"
  log "stage $1 exit ${PIPESTATUS[0]}"
  cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
}
stage 1 exp1,exp1-cached torch
stage 2 sample,exp2 torch-eager
log "done"
