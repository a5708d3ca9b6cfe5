# Sourced by bin/run and bin/test: finds a Python >= 3.12, makes .venv, installs the project.
# Nothing here needs to be done by hand; delete .venv to start over.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MRCOM_VENV:-$ROOT/.venv}"
EXTRAS="${MRCOM_EXTRAS:-dev}"

_py_ok() {  # _py_ok CMD... -> true when CMD is a Python >= 3.12
  "$@" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
  if [[ -n "${MRCOM_PYTHON:-}" ]]; then
    _py_ok "$MRCOM_PYTHON" && { echo "$MRCOM_PYTHON"; return; }
    echo "MRCOM_PYTHON=$MRCOM_PYTHON is not a Python >= 3.12" >&2; return 1
  fi
  # 3.12 first: it is what the project is tested on, and dm_control's labmaze has no wheel
  # for 3.13 yet (pip would try to build it with bazel).
  local c
  for c in python3.12 python3.13 python3.14 python3 python; do
    if command -v "$c" >/dev/null 2>&1 && _py_ok "$c"; then command -v "$c"; return; fi
  done
  # pyenv keeps versions that are installed but not selected: the newest 3.12.x, else newer.
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  if [[ -d "$root/versions" ]]; then
    for c in $(ls -1 "$root/versions" | grep -E '^3\.12(\.[0-9]+)?$' | sort -rV) \
             $(ls -1 "$root/versions" | grep -E '^3\.(1[3-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -V); do
      if _py_ok "$root/versions/$c/bin/python3"; then echo "$root/versions/$c/bin/python3"; return; fi
    done
  fi
  cat >&2 <<'MSG'
error: mrcom-jax needs Python 3.12 or newer (current JAX and chex require it), and none was found.
  Looked for: $MRCOM_PYTHON, python3.12 .. python3.14, python3, and pyenv versions under ~/.pyenv.
  Install one, e.g.  `pyenv install 3.12`  or  `apt-get install python3.12 python3.12-venv`,
  or point MRCOM_PYTHON at an existing interpreter, then run this command again.
MSG
  return 1
}

ensure_venv() {
  if [[ ! -x "$VENV/bin/python" ]] || ! _py_ok "$VENV/bin/python"; then
    local py; py="$(find_python)"
    echo "[mrcom] creating virtual environment $VENV with $py" >&2
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  # Reinstall only when the dependency list changed or an extra is asked for that is not yet
  # installed (the stamp holds the dependency hash and the installed extras, e.g. "<sha>-dev,launch").
  local stamp="$VENV/.mrcom-installed" deps have="" extra need=0
  deps="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha1sum | cut -d' ' -f1)"
  if [[ -f "$stamp" ]] && [[ "$(cut -d- -f1 "$stamp")" == "$deps" ]]; then
    have="$(cut -d- -f2- "$stamp")"
  fi
  for extra in ${EXTRAS//,/ }; do
    [[ ",$have," == *",$extra,"* ]] || need=1
  done
  if [[ -z "$have" || "$need" == 1 ]]; then
    local all; all="$(echo "${have:+$have,}$EXTRAS" | tr ',' '\n' | awk 'NF && !seen[$0]++' | paste -sd,)"
    echo "[mrcom] installing mrcom-jax[$all] into $VENV (first run takes a minute or two)" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$all]"
    echo "$deps-$all" > "$stamp"
  fi
}

# Tests source this file with MRCOM_BOOTSTRAP_DEFINE_ONLY=1 to call find_python alone.
[[ -n "${MRCOM_BOOTSTRAP_DEFINE_ONLY:-}" ]] && return 0

# JAX's persistent compilation cache: compilation dominates on CPU.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mrcom_jax/jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1.0}"
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:-0}"
ensure_venv
cd "$ROOT"
