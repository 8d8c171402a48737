"""Times the training step: raw eager/function/xla (trace off and on) vs Keras fit (XLA off/on).

  python scripts/profile_xla.py --widths=1/16,1/4 --out_dir=runs/profile

The installed command, as a script; see bnraw/cli/profile_xla.py.
"""

from bnraw.cli import profile_xla

if __name__ == "__main__":
  profile_xla.console()
