# Sourced by the scripts (not run): put the project's venv first on PATH, so
# that `python3` and the console scripts (virtio-net-controller, virtnet, ...)
# are the venv's.  scripts/setup makes the venv; where it is not made yet
# (a checkout used with another environment) PATH is left as it is.
#   VFE_VENV=DIR    the venv (default <repo>/.venv)
VFE_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VFE_VENV=${VFE_VENV:-$VFE_REPO/.venv}
case $VFE_VENV in /*) ;; *) VFE_VENV=$PWD/$VFE_VENV ;; esac
export VFE_VENV
if [[ -x "$VFE_VENV/bin/python3" ]]; then
    export VIRTUAL_ENV=$VFE_VENV
    case ":$PATH:" in *":$VFE_VENV/bin:"*) ;; *) export PATH="$VFE_VENV/bin:$PATH" ;; esac
fi
