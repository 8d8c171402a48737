"""The diagnosis over many seeds (and cases, momenta, widths): what usually happens, not one run.

  bnraw-sweep --seeds=0-9 --cases=1,2 --momenta=0,0.9 --out_dir=runs/sweep

Prints a progress line per run, then per setting the median and interquartile range of every
loss and part, how often each cause dominates and how often evaluate > fit; writes sweep.json
after every run (--resume continues an interrupted sweep).
"""

from absl import flags

from bnraw.cli import app
from bnraw.cli import flags as common
from bnraw.errors import UsageError

common.define_common_flags(out_dir="runs/sweep", trace=False)
flags.DEFINE_string("seeds", None, "Seeds: a range START-END (inclusive) and/or a comma list, "
                    "e.g. 0-9 or 0,3,7 (default: --seed).")
flags.DEFINE_list("cases", None, "Cases to sweep (default: --case).")
flags.DEFINE_list("momenta", None, "BN momenta to sweep (default: --momentum).")
flags.DEFINE_list("widths", None, "Widths to sweep, e.g. 1/32,1/16 (default: --width).")
flags.DEFINE_bool("resume", False, "Continue the sweep in --out_dir, keeping its finished runs.")
FLAGS = flags.FLAGS
LISTS = {"seeds": "seed", "cases": "case", "momenta": "momentum", "widths": "width"}


def parse_seeds(text: str) -> list[int]:
  """``"0-9"`` -> 0..9; ``"0,3,5-6"`` -> [0, 3, 5, 6]."""
  seeds = []
  try:
    for part in text.split(","):
      start, _, end = part.strip().partition("-")
      seeds += list(range(int(start), int(end) + 1)) if end else [int(start)]
  except ValueError:
    raise UsageError("seeds", f"expected e.g. 0-9 or 0,3,7, got {text!r}") from None
  if not seeds or min(seeds) < 0:
    raise UsageError("seeds", f"need seeds >= 0, got {text!r}")
  return seeds


def parse_lists() -> dict:
  def parse(name, convert):
    try:
      return [convert(v) for v in FLAGS[name].value] if FLAGS[name].value else None
    except ValueError as e:
      raise UsageError(name, str(e)) from None
  cases = parse("cases", int)
  if cases and not set(cases) <= {1, 2}:
    raise UsageError("cases", f"cases are 1 and 2, got {cases}")
  momenta = parse("momenta", float)
  if momenta and not all(0 <= m <= 1 for m in momenta):
    raise UsageError("momenta", f"must be in [0, 1], got {momenta}")
  seeds = parse_seeds(FLAGS.seeds) if FLAGS.seeds is not None else [FLAGS.seed]
  return {"seeds": seeds, "cases": cases, "momenta": momenta,
          "widths": parse("widths", common.parse_width)}


def check(argv):
  common.reject_extra_args(argv)
  common.check_seed_setup(resume=FLAGS.resume)
  for plural, single in LISTS.items():
    if FLAGS[plural].present:
      common.refuse_present((single,), f"--{plural} is given; it sets this")
  if FLAGS.cases == ["1"]:
    common.refuse_present(("image", "block"), "case 1 has no photo or block (every pixel is i)")
  parse_lists()


def main(argv):
  from bnraw.diagnosis import sweep
  data, model, train = common.configs(announce_width=FLAGS.widths is None)
  result = sweep.run(data, model, train, out_dir=FLAGS.out_dir, resume=FLAGS.resume,
                     overwrite=FLAGS.overwrite, progress=FLAGS.progress, **parse_lists())
  print(sweep.report(result))
  print(f"wrote {FLAGS.out_dir}/{sweep.SWEEP_FILE}")


def console():
  app.run(main, check)


if __name__ == "__main__":
  console()
