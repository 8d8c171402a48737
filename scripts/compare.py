"""Runs the raw path and real Keras ``model.fit`` in lockstep; writes compare.json.

  python scripts/compare.py --width=1/16 --epochs=20 --out_dir=runs/compare

The installed command, as a script; see bnraw/cli/compare.py.
"""

from bnraw.cli import compare

if __name__ == "__main__":
  compare.console()
