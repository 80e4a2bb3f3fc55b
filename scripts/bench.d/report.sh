# scripts/bench report DIR [OUT_DIR]: the report of issue 7 (report.md and report.png) from
# the results in DIR (<scenario>.jsonl, see scripts/bench.d/RESULTS.md), written into OUT_DIR
# (default DIR). Relative paths are taken from the directory scripts/bench was started in.
#   scripts/bench report --venv   only make sure the venv is there (all.sh does this first)
#   scripts/bench report --test   the unit tests of report.py (report_test.py), in the venv
# matplotlib comes from PyPI into the venv ${BENCH_VENV:-${TMPDIR:-/tmp}/fanout-bench-venv},
# reused when it holds the pinned packages, built like ./scripts/check-chart's.

venv=${BENCH_VENV:-${TMPDIR:-/tmp}/fanout-bench-venv}
# Pinned, with everything matplotlib pulls in, so that a fresh machine draws the same chart.
# matplotlib 3.11 needs Python >= 3.11 (Debian 12 has 3.11).
packages=("matplotlib==3.11.2" "contourpy==1.3.3" "cycler==0.12.1" "fonttools==4.68.0" "kiwisolver==1.5.1"
  "numpy==2.4.6" "packaging==26.4" "pillow==13.0.0" "pyparsing==3.3.3" "python-dateutil==4.0.0")

report_die() { echo "==> report: FAILED: $*" >&2; exit 1; }
# A path as the user meant it: relative to where scripts/bench was started (it cds to the repo).
user_path() { case $1 in /*) echo "$1" ;; *) echo "${OLDPWD:-$PWD}/$1" ;; esac; }

mode=${1:-}
case $mode in
  --venv | --test) ;;
  "" | -h | --help)
    sed -n '1,/^$/p' scripts/bench.d/report.sh | sed '$d; s/^# \{0,1\}//' >&2
    exit 2 ;;
  *)
    results=$(user_path "$1")
    out=$(user_path "${2:-$1}")
    [ -d "$results" ] || report_die "$results is not a directory (give the results directory of a run)"
    ;;
esac

report_python() {
  local c
  for c in python3 /usr/bin/python3; do
    if command -v "$c" >/dev/null 2>&1 \
      && "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

apt_install() {
  command -v apt-get >/dev/null || return 1
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || return 1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

venv_ok() {
  [ -x "$venv/bin/python" ] || return 1
  "$venv/bin/python" - "${packages[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if version(name) != want:
        sys.exit(1)
import matplotlib  # noqa: F401
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
PY
}

if venv_ok; then
  echo "==> reusing the venv $venv"
else
  python=$(report_python) || {
    echo "==> python3 >= 3.11 not found: apt-get install python3 python3-venv"
    apt_install python3 python3-venv || report_die "python3 >= 3.11 is required (apt-get install python3 python3-venv failed or is not there)"
    python=$(report_python) || report_die "python3 >= 3.11 is required; this machine's python3 is $(python3 --version 2>&1)"
  }
  if [ -d "$venv" ]; then
    echo "==> the venv $venv is incomplete or outdated: recreating it"
    rm -rf "$venv"
  fi
  if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "==> python3 -m venv is not usable: apt-get install python3-venv"
    py_minor=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install python3-venv || apt_install "python$py_minor-venv" \
      || report_die "python3's venv/ensurepip modules are missing (install python3-venv)"
    "$python" -c 'import venv, ensurepip' >/dev/null 2>&1 || report_die "python3 -m venv still unusable after installing python3-venv"
  fi
  echo "==> creating the venv $venv ($("$python" --version 2>&1))"
  "$python" -m venv "$venv" || report_die "python3 -m venv $venv failed"
  echo "==> pip install ${packages[*]}"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install -q "${packages[@]}" \
    || { rm -rf "$venv"; report_die "pip install ${packages[*]} failed (PyPI must be reachable)"; }
  venv_ok || report_die "the venv $venv does not import matplotlib after pip install"
fi
# matplotlib's font cache, kept with the venv rather than in ~.
export MPLCONFIGDIR=$venv/mplconfig

case $mode in
  --venv) ;;
  --test) "$venv/bin/python" scripts/bench.d/report_test.py -v ;;
  *) "$venv/bin/python" scripts/bench.d/report.py "$results" "$out" ;;
esac
