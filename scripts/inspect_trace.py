"""Prints one BN layer's moving-statistics update at one step of a traced run.

  python scripts/inspect_trace.py --run_dir=runs/t --layer=bn_3 --step=41

Same as the installed ``bnraw-inspect`` command; see ``bnraw/commands/inspect_trace.py``.
"""

from bnraw.commands import inspect_trace

if __name__ == "__main__":
  inspect_trace.console()
