"""The docs stay walkable: README.md is short, every path and link in the docs exists, and design
citations name the file that exists.

Cheap on purpose (no TensorFlow): it reads text files only."""

import os
import re
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 150
# Folders that are not the project's own text (virtualenvs, build outputs, runs, VCS).
SKIPPED_DIRS = {".git", ".venv", "venv", "runs", "build", "dist", "__pycache__", "node_modules"}
# A backticked token that starts like one of these is a repository path.
PATH_ROOTS = ("bnraw/", "scripts/", "tests/", "docs/", ".ci/")
ROOT_FILES = ("README.md", "BUILD.md", "setup.cfg", "pyproject.toml")
GLOB_OR_ELLIPSIS = re.compile(r"[*?\[\]<>{}]|\.\.\.|…")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
DESIGN_CITATION = "DESIGN" + ".md"  # built here so that this file does not cite it itself


def doc_files() -> list[str]:
  """README.md, BUILD.md and docs/*.md, as paths relative to the repository root."""
  found = [name for name in ("README.md", "BUILD.md") if os.path.exists(os.path.join(ROOT, name))]
  docs = os.path.join(ROOT, "docs")
  if os.path.isdir(docs):
    found += sorted(os.path.join("docs", n) for n in os.listdir(docs) if n.endswith(".md"))
  return found


def project_files(*suffixes: str):
  """Every file of the project ending in one of ``suffixes`` (relative paths)."""
  for directory, subdirs, files in os.walk(ROOT):
    subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
    for name in sorted(files):
      if name.endswith(suffixes):
        yield os.path.relpath(os.path.join(directory, name), ROOT)


def read(relative: str) -> str:
  with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
    return f.read()


def split_fences(text: str) -> tuple[str, str]:
  """(prose, code): the text outside fenced code blocks, and the text inside them."""
  prose, code, inside = [], [], False
  for line in text.splitlines():
    if line.lstrip().startswith("```"):
      inside = not inside
      continue
    (code if inside else prose).append(line)
  return "\n".join(prose), "\n".join(code)


def repo_path(token: str):
  """The repository path ``token`` names (``:line`` and trailing punctuation stripped), or None
  when it is not one: not under a known root, or a glob or placeholder (``scripts/NAME.py``)."""
  token = token.strip("'\"(),;")
  if not (token.startswith(PATH_ROOTS) or token in ROOT_FILES):
    return None
  token = re.sub(r":\d+(-\d+)?$", "", token)  # bnraw/core/layers.py:203
  token = token.split("#")[0].rstrip(".:,")
  if token in ROOT_FILES:
    return token
  if GLOB_OR_ELLIPSIS.search(token) or any(is_placeholder(part) for part in token.split("/")):
    return None
  return token


def is_placeholder(segment: str) -> bool:
  """``NAME.py``, ``OUT``: a segment in capitals stands for a name the reader picks."""
  stem = segment.split(".")[0]
  return len(stem) > 1 and stem.replace("_", "").isalpha() and stem.isupper()


def mentioned_paths(text: str) -> set[str]:
  """Repository paths in backticks in the prose, and path-like tokens inside code blocks."""
  prose, code = split_fences(text)
  tokens = []
  for span in re.findall(r"`([^`\n]+)`", prose):
    tokens += span.split()
  tokens += code.split()
  return {path for path in map(repo_path, tokens) if path}


def github_anchor(heading: str) -> str:
  """The anchor GitHub gives a markdown heading: lower case, punctuation but ``-`` and ``_``
  dropped, spaces made hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(relative: str) -> set[str]:
  prose, _ = split_fences(read(relative))
  return {github_anchor(line.lstrip("#")) for line in prose.splitlines()
          if re.match(r"#{1,6} ", line)}


class ReadmeTest(unittest.TestCase):

  def test_readme_is_short(self):
    lines = read("README.md").count("\n")
    self.assertLessEqual(lines, README_MAX_LINES,
                         "README.md is the front page: move depth into docs/ and link to it")


class PathsTest(unittest.TestCase):

  def test_every_mentioned_repo_path_exists(self):
    for doc in doc_files():
      for path in sorted(mentioned_paths(read(doc))):
        with self.subTest(doc=doc, path=path):
          self.assertTrue(os.path.exists(os.path.join(ROOT, path)), f"{doc} names {path}")

  def test_every_relative_link_resolves(self):
    for doc in doc_files():
      prose, _ = split_fences(read(doc))
      for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
          continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        with self.subTest(doc=doc, link=target):
          self.assertTrue(os.path.exists(os.path.join(ROOT, resolved)), f"{doc} links {target}")
          if anchor and resolved.endswith(".md"):
            self.assertIn(anchor, anchors(resolved), f"{doc} links a missing heading: {target}")


class DesignCitationTest(unittest.TestCase):

  def test_design_is_cited_as_docs_design_md(self):
    # Docstrings cite "docs/design.md section N"; the repository has no other design file.
    this = os.path.relpath(os.path.abspath(__file__), ROOT)
    for path in project_files(".md", ".py"):
      if path == this:
        continue
      in_docs = path.startswith("docs" + os.sep)
      for number, line in enumerate(read(path).splitlines(), 1):
        for citation in re.findall(r"\S*design\.md", line, flags=re.IGNORECASE):
          with self.subTest(file=f"{path}:{number}", citation=citation):
            self.assertNotIn(DESIGN_CITATION, citation, "cite it as docs/design.md")
            if not in_docs:  # inside docs/ a relative design.md is the same file
              self.assertTrue(citation.endswith("docs/design.md"), "cite it as docs/design.md")


if __name__ == "__main__":
  unittest.main()
