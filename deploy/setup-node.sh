#!/usr/bin/env bash
# Install mlaserve on one cluster node (run by `ray up` as a setup command; safe to rerun).
#
#   MLASERVE_CUDA=ON bash ~/mlaserve/deploy/setup-node.sh
#
# 1. a virtualenv (~/mlaserve-venv, or $MLASERVE_VENV) that login shells activate, so that `ray`
#    and `mlaserve` resolve to it in the start commands;
# 2. nvcc from CUDA >= 12.3 (sm_90a): $CUDACXX, PATH, /usr/local/cuda*, else NVIDIA's apt
#    repository (Ubuntu) unless MLASERVE_INSTALL_CUDA=0;
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
cuda_ok() {  # cuda_ok NVCC -> 0 when it reports release >= MIN
  local rel
  rel=$("$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
  [[ -n "$rel" ]] || return 1
  set -- $rel
  (( $1 > MIN_CUDA_MAJOR || ($1 == MIN_CUDA_MAJOR && $2 >= MIN_CUDA_MINOR) ))
}

find_nvcc() {
  local c
  for c in ${CUDACXX:-} "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc \
    $(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -t- -k2 -V -r); do
    if [[ -n "$c" && -x "$c" ]] && cuda_ok "$c"; then echo "$c"; return 0; fi
  done
  return 1
}

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
