"""Trains the seed network with the raw path; writes summary.json (and trace.npz with --trace).

  python scripts/train.py --case=2 --epochs=500 --out_dir=runs/train

The installed command, as a script; see bnraw/cli/train.py.
"""

from bnraw.cli import train

if __name__ == "__main__":
  train.console()
