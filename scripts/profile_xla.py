"""Times the training step: raw eager/function/xla (trace off/on) vs Keras fit (XLA off/on).

  python scripts/profile_xla.py --widths=1/16,1/4 --out_dir=runs/profile

Same as the installed ``bnraw-profile`` command; see ``bnraw/commands/profile_xla.py``.
"""

from bnraw.commands import profile_xla

if __name__ == "__main__":
  profile_xla.console()
