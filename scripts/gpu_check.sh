#!/usr/bin/env bash
# The one command a session lent a GPU runs: the project on the GPU machine's own stack (its
# preinstalled torch, triton and transformers; no network, nothing reinstalled), in under 8
# minutes, writing its tables to a folder:
#
#   env.md              versions, the device, what imports
#   kernels.md          fused kernels: GB/s, % of HBM peak, x eager, x compile
#   train.md            the Trainer on the GPU: nccl, bf16, fused kernels, compiled vs eager
#   throughput_300m.md  300m at seq 512, bf16, eager vs compiled (and transformers'), MFU
#   summary.md          each stage's status and seconds
#
#   bash scripts/gpu_check.sh                    # tables in $OUT (the device tool's folder) or runs/gpu_check
#   bash scripts/gpu_check.sh --out DIR
#   bash scripts/gpu_check.sh --dry-run --out DIR   # CPU, toy sizes: the tables' form (tests/test_speed.py)
#
# The project is not pip-installed: kernels/, pretrain/ and finetune/ are installed inside the
# rapidnlp namespace (setup.py's package_dir), so a copy of that layout goes to a temporary folder
# on PYTHONPATH, with the knowledge C++ extension built there for this Python when pybind11 is
# present (only the knowledge pipeline needs it; no stage here does).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
out_dir=${OUT:-runs/gpu_check}
dry_run=()
while [ $# -gt 0 ]; do
    case $1 in
        --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }; out_dir=$2; shift 2 ;;
        --out=*) out_dir=${1#--out=}; shift ;;
        --dry-run) dry_run=(--dry-run); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (expected --out DIR, --dry-run or --help)" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "gpu_check.sh: $python not found (set PYTHON)" >&2; exit 2; }
mkdir -p "$out_dir" || exit 2

stage=$(mktemp -d "${TMPDIR:-/tmp}/rapidnlp_gpu_check.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/rapidnlp"
cp -r rapidnlp/. "$stage/rapidnlp/"
find "$stage/rapidnlp" \( -name '__pycache__' -o -name '*.so' \) -prune -exec rm -rf {} +
for sub in kernels pretrain finetune; do cp -r "$sub" "$stage/rapidnlp/$sub"; done
if "$python" -c "import pybind11" 2>/dev/null; then
    suffix=$("$python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    # shellcheck disable=SC2046  # the include flags are several words
    if ! c++ -O3 -shared -std=c++17 -fPIC $("$python" -m pybind11 --includes) rapidnlp/data/csrc/knowledge.cpp \
            -o "$stage/rapidnlp/data/knowledge/_native$suffix" 2>"$out_dir/native_build.log"; then
        echo "note: the knowledge C++ extension did not build (see $out_dir/native_build.log)"
    fi
else
    echo "note: pybind11 is not installed: the knowledge C++ extension is not built (no stage here needs it)"
fi
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
exec "$python" scripts/gpu_check.py --out "$out_dir" ${dry_run[@]+"${dry_run[@]}"}
