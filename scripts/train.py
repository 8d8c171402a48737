"""Trains the seed network with the raw path; writes summary.json.

  python scripts/train.py --case=2 --epochs=500 --out_dir=runs/train

Same as the installed ``bnraw-train`` command; see ``bnraw/commands/train.py`` for the flags.
"""

from bnraw.commands import train

if __name__ == "__main__":
  train.console()
