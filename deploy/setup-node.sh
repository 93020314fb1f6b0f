#!/usr/bin/env bash
# Install mlaserve on one cluster node (run by `ray up` as a setup command; safe to rerun).
#
#   MLASERVE_CUDA=ON bash ~/mlaserve/deploy/setup-node.sh
#   bash deploy/setup-node.sh --find-nvcc     # only print the nvcc it would use
#
# 1. a virtualenv (~/mlaserve-venv, or $MLASERVE_VENV) that login shells activate, so that `ray`
#    and `mlaserve` resolve to it in the start commands;
# 2. nvcc from CUDA >= 12.3 (sm_90a): $CUDACXX, else the newest on PATH or under
#    $MLASERVE_CUDA_ROOTS (/usr/local/cuda*), else from NVIDIA's apt repository (Ubuntu) unless
#    MLASERVE_INSTALL_CUDA=0;
# 3. `pip install` of the checkout in $MLASERVE_SRC (default ~/mlaserve, synced by file_mounts),
#    compiling the kernel with MLASERVE_CUDA (default ON: a build without the kernel fails here,
#    not later on a GPU node), Ray pinned to $MLASERVE_RAY_VERSION if set; then a check that the
#    extension was installed.
set -euo pipefail

SRC=${MLASERVE_SRC:-$HOME/mlaserve}
VENV=${MLASERVE_VENV:-$HOME/mlaserve-venv}
export MLASERVE_CUDA=${MLASERVE_CUDA:-ON}
MIN_CUDA_MAJOR=12
MIN_CUDA_MINOR=3

log() { echo "[mlaserve setup] $*" >&2; }

sudo_if_needed() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

cuda_version() {  # cuda_version NVCC -> prints major*100+minor of its release
  local rel
  rel=$("$1" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -n 1)
  [[ -n "$rel" ]] || return 1
  set -- $rel
  echo $(($1 * 100 + $2))
}

find_nvcc() {  # $CUDACXX if recent enough, else the newest nvcc >= MIN on PATH or under the CUDA roots
  local min=$((MIN_CUDA_MAJOR * 100 + MIN_CUDA_MINOR)) best="" best_v=0 c v root
  if [[ -n "${CUDACXX:-}" && -x "${CUDACXX}" ]] && v=$(cuda_version "$CUDACXX") && ((v >= min)); then
    echo "$CUDACXX"
    return 0
  fi
  for c in "$(command -v nvcc || true)" $(for root in ${MLASERVE_CUDA_ROOTS:-/usr/local/cuda /usr/local/cuda-*}; do
    echo "$root/bin/nvcc"
  done); do
    [[ -n "$c" && -x "$c" ]] || continue
    v=$(cuda_version "$c") || continue
    if ((v >= min && v > best_v)); then
      best=$c
      best_v=$v
    fi
  done
  [[ -n "$best" ]] && echo "$best"
}

# `setup-node.sh --find-nvcc`: only print the nvcc this script would build with (or fail).
if [[ "${1:-}" == "--find-nvcc" ]]; then
  find_nvcc
  exit
fi

# --- 1. Python environment -------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  PY=${MLASERVE_PYTHON:-python3}
  if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    log "need Python >= 3.10 (set MLASERVE_PYTHON); found: $("$PY" --version 2>&1 || echo none)"
    exit 1
  fi
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    log "python venv module missing: installing python3-venv"
    sudo_if_needed apt-get update -y
    sudo_if_needed apt-get install -y "python3-venv" "python$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv" || true
    "$PY" -m venv "$VENV"
  fi
fi
# Ray runs the start commands in login shells: activate the venv there (once).
ACTIVATE="source $VENV/bin/activate"
grep -qxF "$ACTIVATE" "$HOME/.bashrc" 2>/dev/null || echo "$ACTIVATE" >>"$HOME/.bashrc"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip

# --- 2. nvcc (CUDA >= 12.3) --------------------------------------------------------------------
NVCC=""
if [[ "$MLASERVE_CUDA" != "OFF" ]]; then
  NVCC=$(find_nvcc || true)
  if [[ -z "$NVCC" && "${MLASERVE_INSTALL_CUDA:-1}" == "1" && -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    . /etc/os-release
    if [[ "${ID:-}" == "ubuntu" ]]; then
      repo="ubuntu${VERSION_ID//./}"
      log "no CUDA >= $MIN_CUDA_MAJOR.$MIN_CUDA_MINOR nvcc found: installing cuda-toolkit-12-8 from NVIDIA's $repo repository"
      tmp=$(mktemp -d)
      curl -fsSL -o "$tmp/cuda-keyring.deb" \
        "https://developer.download.nvidia.com/compute/cuda/repos/$repo/x86_64/cuda-keyring_1.1-1_all.deb"
      sudo_if_needed dpkg -i "$tmp/cuda-keyring.deb"
      sudo_if_needed apt-get update -y
      sudo_if_needed apt-get install -y cuda-toolkit-12-8
      rm -rf "$tmp"
      NVCC=$(find_nvcc || true)
    fi
  fi
  if [[ -z "$NVCC" ]]; then
    if [[ "$MLASERVE_CUDA" == "ON" ]]; then
      log "MLASERVE_CUDA=ON but no nvcc from CUDA >= $MIN_CUDA_MAJOR.$MIN_CUDA_MINOR was found (set CUDACXX)"
      exit 1
    fi
    log "no suitable nvcc: building without the kernel (reference backend only)"
  else
    export CUDACXX="$NVCC"
    export PATH="$(dirname "$NVCC"):$PATH"
    log "using $("$NVCC" --version | tail -n 2 | head -n 1) at $NVCC"
  fi
fi

# --- 3. mlaserve ---------------------------------------------------------------------------------
if [[ ! -f "$SRC/pyproject.toml" ]]; then
  log "no mlaserve checkout at $SRC (file_mounts syncs it; or set MLASERVE_SRC)"
  exit 1
fi
log "pip install $SRC (MLASERVE_CUDA=$MLASERVE_CUDA)"
python -m pip install --quiet "$SRC"
if [[ -n "${MLASERVE_RAY_VERSION:-}" ]]; then  # match the Ray you run `ray up` / `ray job submit` with
  python -m pip install --quiet "ray[default]==$MLASERVE_RAY_VERSION"
fi

if [[ "$MLASERVE_CUDA" == "ON" ]]; then
  python - <<'PY'
import importlib.util, sys
spec = importlib.util.find_spec("mlaserve.worker.kernels._C")
if spec is None:
    sys.exit("[mlaserve setup] the sm_90a extension mlaserve.worker.kernels._C was not installed")
print(f"[mlaserve setup] kernel extension: {spec.origin}", file=sys.stderr)
PY
fi
python -c "import ray, mlaserve.cluster.cli; print(f'[mlaserve setup] ready: ray {ray.__version__}')" >&2
