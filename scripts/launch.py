"""Starts a multi-worker run as W local worker processes (TF_CONFIG each); see bnraw/cli/launch.py.

  python scripts/launch.py --workers=2 -- bnraw-train --epochs=10 --out_dir=runs/mw

The installed command, as a script.
"""

from bnraw.cli import launch

if __name__ == "__main__":
  launch.console()
