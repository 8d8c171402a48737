"""The diagnosis over many seeds (and cases, momenta, widths): what usually happens, not one run.

  python scripts/sweep.py --seeds=0-9 --cases=1,2 --momenta=0,0.9 --out_dir=runs/sweep

The installed command, as a script; see bnraw/cli/sweep.py.
"""

from bnraw.cli import sweep

if __name__ == "__main__":
  sweep.console()
