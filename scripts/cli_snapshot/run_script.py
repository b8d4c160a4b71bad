"""Run one console script of a vfe checkout as pip's wrapper would:
``run_script.py CHECKOUT NAME [ARGS...]`` looks NAME up in CHECKOUT's
pyproject.toml [project.scripts], sets sys.argv[0] to NAME and exits with
what its function returns.  CHECKOUT's code must be the one imported (it is
first on PYTHONPATH); anything else aborts with status 99."""
import importlib
import os
import sys
import tomllib

checkout, name, args = os.path.realpath(sys.argv[1]), sys.argv[2], sys.argv[3:]
with open(os.path.join(checkout, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
module, _, func = scripts[name].partition(":")
mod = importlib.import_module(module)
if not os.path.realpath(mod.__file__).startswith(checkout + os.sep):
    sys.stderr.write(f"run_script: {module} came from {mod.__file__}, not {checkout}\n")
    sys.exit(99)
sys.argv = [name, *args]
sys.exit(getattr(mod, func)())
