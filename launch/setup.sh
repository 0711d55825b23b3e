#!/usr/bin/env bash
# Builds, or reuses in seconds, the project environment in .venv/ at the repo root:
# system packages (when root), Python packages pinned by launch/constraints.txt, and Horovod 0.28.1
# compiled from the registry's source distribution with PyTorch, TensorFlow, Gloo and MPI.
#
# The Horovod wheel is cached outside the repo, keyed by the versions it was built against and by every
# HOROVOD_* build variable in the environment, so GPU users' builds (HOROVOD_GPU_OPERATIONS=NCCL, ...)
# never collide with the CPU build.  Set RANGER_HVD_CACHE to move the cache.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
constraints="$root/launch/constraints.txt"
horovod_version=0.28.1
python_bin=${RANGER_HVD_PYTHON:-python3.11}
cache_root=${RANGER_HVD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ranger_hvd}

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# --- fast path: nothing changed since the last successful setup -----------------------------------
stamp_inputs() {
  cat "$root/launch/setup.sh" "$constraints" "$root/pyproject.toml" "$root/launch/toolchain/horovod-cxx"
  env | grep -E '^HOROVOD_' | sort || true
}
stamp=$(stamp_inputs | sha256sum | cut -c1-16)
if [ -f "$venv/.setup-stamp" ] && [ "$(cat "$venv/.setup-stamp")" = "$stamp" ] \
   && command -v mpirun >/dev/null && [ -x "$venv/bin/horovodrun" ] \
   && grep -qsF "'$root/ranger_hvd'" "$venv"/lib/python3*/site-packages/__editable___ranger_hvd_*finder.py; then
  # (the last test: the editable install is this checkout's, not one of a moved or borrowed .venv)
  exit 0
fi
started=$(date +%s)

# --- system packages ----------------------------------------------------------------------------
need_apt=()
command -v mpirun >/dev/null || need_apt+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include ] \
  || command -v mpicc >/dev/null || need_apt+=(libopenmpi-dev)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null || need_apt+=(openssh-client)
command -v ip >/dev/null || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing system packages: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    die "missing system packages: ${need_apt[*]} (install them as root, e.g. apt-get install ${need_apt[*]})"
  fi
fi

# --- virtual environment and pinned Python packages ---------------------------------------------
command -v "$python_bin" >/dev/null || die "$python_bin not found (set RANGER_HVD_PYTHON to a Python 3.11)"
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c "$constraints" pip setuptools wheel
# The project and its runtime, test and framework dependencies; the constraints pin every version
# (torch==2.13.0 is the CPU build on this machine's disk: other releases pull multi-GB CUDA builds).
"${pip[@]}" install -c "$constraints" -e "$root[torch,tensorflow,test]"

# --- Horovod, built once and cached ---------------------------------------------------------------
versions=$(TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/python" - <<'PY'
import sys, torch, tensorflow as tf
print(f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}-tf{tf.__version__}")
PY
)
build_key=$( { env | grep -E '^HOROVOD_' | grep -vE '^HOROVOD_(LOG_LEVEL|FUSION|CYCLE|TIMELINE|HIERARCHICAL|AUTOTUNE)' | sort; \
               cat "$root/launch/toolchain/horovod-cxx"; } | sha256sum | cut -c1-12)
wheel_dir="$cache_root/wheels/horovod-$horovod_version-$versions-$build_key"
wheel=$(ls "$wheel_dir"/horovod-"$horovod_version"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  say "building Horovod $horovod_version ($versions); this takes a few minutes once, then it is cached in $wheel_dir"
  mkdir -p "$wheel_dir"
  log="$wheel_dir/build.log"
  # The build sees torch and TF from the venv (no isolation).  Defaults describe a CPU build; any
  # HOROVOD_* variable the user exported (GPU operations, CUDA home, ...) wins over them.
  if ! env \
      HOROVOD_WITH_PYTORCH="${HOROVOD_WITH_PYTORCH:-1}" \
      HOROVOD_WITH_TENSORFLOW="${HOROVOD_WITH_TENSORFLOW:-1}" \
      HOROVOD_WITH_GLOO="${HOROVOD_WITH_GLOO:-1}" \
      HOROVOD_WITH_MPI="${HOROVOD_WITH_MPI:-1}" \
      HOROVOD_WITHOUT_MXNET="${HOROVOD_WITHOUT_MXNET:-1}" \
      HOROVOD_CMAKE="${HOROVOD_CMAKE:-$(command -v cmake)}" \
      CMAKE_POLICY_VERSION_MINIMUM=3.5 \
      RANGER_HVD_REAL_CXX="${CXX:-g++}" \
      CXX="$root/launch/toolchain/horovod-cxx" \
      MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}" \
      PATH="$venv/bin:$PATH" \
      "$venv/bin/python" -m pip --disable-pip-version-check wheel --no-build-isolation --no-deps \
        --no-binary horovod "horovod==$horovod_version" -w "$wheel_dir" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "Horovod build failed; full log: $log"
  fi
  wheel=$(ls "$wheel_dir"/horovod-"$horovod_version"-*.whl | head -n1)
fi
"${pip[@]}" install -c "$constraints" --no-deps --force-reinstall "$wheel"

# --- check what Horovod was built with -------------------------------------------------------------
check=$(PATH="$venv/bin:$PATH" "$venv/bin/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $check"
missing=()
for part in TensorFlow PyTorch MPI Gloo; do
  grep -qE "\[X\] $part\b" <<<"$check" || missing+=("$part")
done
[ ${#missing[@]} -eq 0 ] || die "Horovod was built without: ${missing[*]}. horovodrun --check-build said:
$check
Remove $wheel_dir to rebuild."

echo "$stamp" >"$venv/.setup-stamp"
say "environment ready in $(( $(date +%s) - started ))s"
