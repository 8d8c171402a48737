"""Bad input, which the command line turns into one line and exit status 2 (bnraw.cli.app).
Library code names its inputs (a config field, a file, an array), never a command-line flag."""


class UsageError(ValueError):
  """Bad input: ``subject`` is the input at fault (a config field such as ``batch_size``, or
  ``keras_model``, ``data``...), ``problem`` what is wrong with it."""

  def __init__(self, subject: str, problem: str):
    super().__init__(f"{subject}: {problem}" if subject else problem)
    self.subject = subject
    self.problem = problem
