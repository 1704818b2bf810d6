"""Import directions between rae_jax's packages, read from the source (no imports executed).

Every `import rae_jax.x...` / `from rae_jax.x... import` counts, including ones inside functions:
a lazy import is still a dependency. The layers, bottom up:
  models                          pure Flax, imports no other rae_jax package
  diffusion, losses -> models;  data -> nothing;  train -> config_checks (its ConfigError)
  eval -> models, diffusion, train (mesh helpers)
  interop -> what it reads weights into (models, losses, eval) and train -- never pipeline
  pipeline -> all of the above;  modes (the CLI table) -> pipeline
Root helpers: presets, atomic and rae_jax/__init__ import nothing; config_checks -> models, data;
storage (the path layer for local disk and gs://) -> atomic, and every layer may import it.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "rae_jax"
ALLOWED = {
    "models": {"storage", "progress"},
    "diffusion": {"models"},
    "losses": {"models", "storage"},
    "data": {"storage", "progress"},
    "train": {"config_checks", "atomic", "storage", "progress"},
    "eval": {"models", "diffusion", "train", "storage", "progress"},
    "interop": {"models", "losses", "eval", "train", "atomic", "storage"},
    "pipeline": {"models", "diffusion", "losses", "data", "train", "eval", "interop",
                 "config_checks", "presets", "atomic", "storage", "progress"},
    "config_checks": {"models", "data", "storage"},
    "presets": set(),
    "atomic": set(),
    "storage": {"atomic"},  # the one path layer: every layer may use it
    "progress": set(),  # tqdm bars of the long passes: every layer may use it
    "workdir_lock": {"storage"},
    "modes": {"config_checks", "train", "pipeline", "presets", "workdir_lock", "storage"},
    "__init__": set(),  # rae_jax/__init__.py: importing anything would load it for every user
}
# Known edges still to move, each with where it should go. The test fails when one disappears
# (delete it here) so the list cannot go stale.
KNOWN: dict[tuple[str, str], str] = {}


def _modules():
  return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _unit(rel: pathlib.PurePath) -> str:
  """Top-level package (models, ...) or root module (presets, ...) a file belongs to."""
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path) -> set[str]:
  """Dotted rae_jax modules imported anywhere in the file (module-level and lazy)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("rae_jax.")}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      if node.module == "rae_jax":  # from rae_jax import presets
        out |= {f"rae_jax.{a.name}" for a in node.names}
      elif node.module.startswith("rae_jax."):
        out.add(node.module)
        out |= {f"{node.module}.{a.name}" for a in node.names}  # from pkg import module
    elif isinstance(node, ast.ImportFrom) and node.level:
      raise AssertionError(f"{path}: relative import; the layering test reads absolute ones")
  return out


def _edges():
  """{(file relative to rae_jax, imported unit)} across units."""
  edges = set()
  for path in _modules():
    rel = path.relative_to(ROOT)
    src = _unit(rel)
    for mod in _imports(path):
      dst = mod.split(".")[1]
      if dst != src:
        edges.add((rel.as_posix(), dst))
  return edges


def test_every_unit_has_a_rule():
  units = {_unit(p.relative_to(ROOT)) for p in _modules()}
  assert units <= set(ALLOWED), f"new top-level unit(s) {sorted(units - set(ALLOWED))}: add a rule"


def test_import_directions():
  bad = sorted(f"{f} imports rae_jax.{dst} ({_unit(pathlib.PurePath(f))} may import only "
               f"{sorted(ALLOWED[_unit(pathlib.PurePath(f))])})"
               for f, dst in _edges()
               if dst not in ALLOWED[_unit(pathlib.PurePath(f))] and (f, dst) not in KNOWN)
  assert not bad, "layering violated:\n" + "\n".join(bad)


def test_known_exceptions_still_exist():
  stale = sorted(set(KNOWN) - _edges())
  assert not stale, f"fixed, remove from KNOWN: {stale}"


def _module_graph():
  """Module -> imported modules, within rae_jax (package imports resolve to __init__)."""
  names = {}
  for path in _modules():
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    names[".".join(("rae_jax",) + parts)] = path
  graph = {}
  for mod, path in names.items():
    graph[mod] = {m for m in _imports(path) if m in names and m != mod}
  return graph


def _cycle(graph):
  """One import cycle as a list of modules, or None (iterative DFS, colours)."""
  colour = {m: 0 for m in graph}
  for start in graph:
    if colour[start]:
      continue
    stack = [(start, iter(sorted(graph[start])))]
    path = [start]
    colour[start] = 1
    while stack:
      node, it = stack[-1]
      nxt = next(it, None)
      if nxt is None:
        colour[node] = 2
        stack.pop()
        path.pop()
      elif colour[nxt] == 1:
        return path[path.index(nxt):] + [nxt]
      elif colour[nxt] == 0:
        colour[nxt] = 1
        stack.append((nxt, iter(sorted(graph[nxt]))))
        path.append(nxt)
  return None


def test_no_module_import_cycles():
  # e.g. pipeline.stage2 <-> evaluate <-> sample, which shared loaders now break
  # (rae_jax.pipeline.loaders); package __init__ re-exports count like any import.
  cyc = _cycle(_module_graph())
  assert cyc is None, "import cycle: " + " -> ".join(cyc)


@pytest.mark.parametrize("src,dst,should_fail", [
    ("import rae_jax.pipeline.builders\n", "models", True),
    ("from rae_jax import presets\n", "models", True),
    ("def f():\n  from rae_jax.interop import stats\n", "models", True),
    ("from rae_jax.models import layers\n", "diffusion", False),
])
def test_checker_sees_every_import_form(tmp_path, src, dst, should_fail):
  # The rule check itself, on synthetic files: lazy and `from rae_jax import x` forms count.
  f = tmp_path / "m.py"
  f.write_text(src)
  targets = {m.split(".")[1] for m in _imports(f)}
  assert bool(targets - ALLOWED[dst]) == should_fail


def test_checker_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) in (
      ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
  assert _cycle({"a": {"b"}, "b": set()}) is None
