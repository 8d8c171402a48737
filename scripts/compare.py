"""Runs the raw path and real Keras ``model.fit`` in lockstep; writes compare.json.

  python scripts/compare.py --width=1/16 --epochs=20 --out_dir=runs/compare

Same as the installed command; flags and behaviour live in ``bnraw/cli/compare.py``.
"""

from bnraw.cli import compare

if __name__ == "__main__":
  compare.console()
