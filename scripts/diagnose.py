"""Why does evaluate disagree with fit? Trains the seed setup and splits the gap into causes.

  python scripts/diagnose.py --case=2 --momentum=0.9 --out_dir=runs/diagnose

The installed command, as a script; see bnraw/cli/diagnose.py.
"""

from bnraw.cli import diagnose

if __name__ == "__main__":
  diagnose.console()
