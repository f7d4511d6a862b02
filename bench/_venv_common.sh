# Shared by bench/setup_peer_env.sh and bench/setup_trl_env.sh (sourced, not run): the step timer, a quiet pip
# install into "$PY", and creating the venv "$VENV" when it does not exist yet. The caller sets VENV and PY.

step() {  # step NAME CMD...: run CMD, print its wall time
  local name="$1"; shift
  local t0=$SECONDS
  echo "==> $name"
  "$@"
  echo "<== $name: $((SECONDS - t0)) s"
}

pip_install() {  # pip install -q ARGS..., without the file:// index noise of this machine's pip.conf
  "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }  # pipefail: pip's rc
}

if [ ! -x "$PY" ]; then
  step "create venv $VENV" python3 -m venv "$VENV"
  step "upgrade pip" pip_install --upgrade pip
fi
