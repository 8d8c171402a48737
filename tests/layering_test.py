"""The layers of the package: the core imports nothing above itself; only the CLI uses flags.

Checked on the source (``import tensorflow`` itself loads Keras, so a loaded-modules check could
not tell the core's imports from TensorFlow's)."""

import ast
import os
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "bnraw")


def imports(path):
  """Every module name ``path`` imports (absolute; relative imports are refused elsewhere)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      found.add("." * node.level + (node.module or ""))
  return found


def modules(folder):
  for directory, _, files in os.walk(os.path.join(PACKAGE, folder)):
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.join(directory, name)


class LayeringTest(unittest.TestCase):

  def test_core_imports_only_tensorflow_numpy_stdlib_and_itself(self):
    allowed_third_party = {"tensorflow", "numpy"}
    for path in modules("core"):
      for name in imports(path):
        top = name.split(".")[0]
        with self.subTest(module=os.path.relpath(path, ROOT), imports=name):
          self.assertFalse(name.startswith("."), "relative import")
          if top == "bnraw":
            self.assertTrue(name.startswith("bnraw.core"), "imports above the core")
          else:
            self.assertTrue(top in allowed_third_party or top in sys.stdlib_module_names,
                            "a dependency the core must not have")
          self.assertNotIn(top, {"keras", "tf_keras", "absl", "json", "os", "io", "pickle"})

  def test_core_does_no_file_io(self):
    for path in modules("core"):
      tree = ast.parse(open(path).read())
      calls = {node.func.id for node in ast.walk(tree)
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
      self.assertNotIn("open", calls, path)

  def test_only_the_cli_uses_flags(self):
    for path in modules(""):
      if os.sep + "cli" + os.sep in path:
        continue
      for name in imports(path):
        with self.subTest(module=os.path.relpath(path, ROOT)):
          self.assertFalse(name.startswith("absl"), name)


class FastRefusalTest(unittest.TestCase):

  def test_command_modules_import_no_tensorflow(self):
    # flags are parsed and checked before TensorFlow loads: a bad flag costs no start-up
    for command in ("train", "compare", "diagnose", "inspect_trace", "profile_xla", "sweep"):
      code = f"import sys, bnraw.cli.{command}; print('tensorflow' in sys.modules)"
      out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=ROOT)
      self.assertEqual(out.returncode, 0, out.stderr)
      self.assertEqual(out.stdout.strip(), "False", command)


if __name__ == "__main__":
  unittest.main()
