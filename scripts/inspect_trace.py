"""Prints one BN layer's moving-statistics update at one step of a traced run.

  python scripts/inspect_trace.py --run_dir=runs/t --layer=bn_3 --step=41

The installed command, as a script; see bnraw/cli/inspect_trace.py.
"""

from bnraw.cli import inspect_trace

if __name__ == "__main__":
  inspect_trace.console()
