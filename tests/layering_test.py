"""The layers of the package, checked on the source, imports inside functions included:

    {errors, core}  <  {config, outputs, progress, cluster}  <  machine  <  models
      <  tracing  <  {parity, diagnosis, training, profiling}  <  cli

A module imports only from lower layers or its own package, so there is no cycle; the core
imports nothing above itself; only the CLI uses flags. (``import tensorflow`` itself loads
Keras, so a loaded-modules check could not tell the core's imports from TensorFlow's.)"""

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


LAYERS = {  # the top of a module's name -> its layer
    "bnraw": 0, "bnraw.errors": 0, "bnraw.core": 0, "bnraw.config": 1, "bnraw.outputs": 1,
    "bnraw.progress": 1, "bnraw.cluster": 1, "bnraw.machine": 2, "bnraw.models": 3,
    "bnraw.tracing": 4, "bnraw.parity": 5, "bnraw.diagnosis": 5, "bnraw.training": 5,
    "bnraw.profiling": 5, "bnraw.cli": 6,
}


def module_name(path):
  relative = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return relative[:-len(".__init__")] if relative.endswith(".__init__") else relative


def package_of(name):
  """``bnraw.models.twin`` -> ``bnraw.models``; a top-level module is its own package."""
  parts = name.split(".")
  return ".".join(parts[:2])


def bnraw_imports(path):
  """Every bnraw module ``path`` imports, ``from bnraw.x import y`` as ``bnraw.x.y`` when y is
  a module (so ``from bnraw import parity`` counts as importing bnraw.parity)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name.startswith("bnraw"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnraw"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        is_module = (os.path.exists(os.path.join(ROOT, *full.split(".")) + ".py")
                     or os.path.isdir(os.path.join(ROOT, *full.split("."))))
        found.add(full if is_module else node.module)
  return found


class PackageLayersTest(unittest.TestCase):

  def test_every_module_has_a_layer(self):
    for path in modules(""):
      self.assertIn(package_of(module_name(path)), LAYERS, path)

  def test_no_module_imports_upward_or_sideways(self):
    for path in modules(""):
      importer = module_name(path)
      own = package_of(importer)
      for name in bnraw_imports(path):
        target = package_of(name)
        with self.subTest(module=importer, imports=name):
          if target == own and own != "bnraw":
            continue  # within one package
          self.assertLess(LAYERS[target], LAYERS[own] if importer != "bnraw" else 1,
                          f"{importer} (layer {LAYERS[own]}) imports {name} "
                          f"(layer {LAYERS[target]})")

  def test_no_import_cycle_between_modules(self):
    graph = {module_name(path): {n for n in bnraw_imports(path)} for path in modules("")}
    known = set(graph)
    graph = {m: {n if n in known else n.rsplit(".", 1)[0] for n in targets} & known - {m}
             for m, targets in graph.items()}
    visiting, done = set(), set()

    def visit(m, chain):
      if m in done:
        return
      self.assertNotIn(m, visiting, "import cycle: " + " -> ".join(chain + [m]))
      visiting.add(m)
      for n in sorted(graph[m]):
        if not (m == "bnraw" or n == "bnraw"):  # the package's lazy names are not imports
          visit(n, chain + [m])
      visiting.discard(m)
      done.add(m)

    for m in sorted(graph):
      visit(m, [])


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
