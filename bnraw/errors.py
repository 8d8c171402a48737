"""The one exception type the scripts turn into a one-line message and exit status 2."""


class UsageError(ValueError):
  """Bad input from the user: names the flag (or input) at fault and the problem."""

  def __init__(self, flag: str, problem: str):
    super().__init__(f"--{flag}: {problem}")
    self.flag = flag
    self.problem = problem
