"""The import graph reads like the data flow: no upward edge, no cycle, first-party imports at the top.

`python tests/test_layering.py` prints the graph (module → the first-party modules it imports).
Layers, bottom up: facts (constants, errors, environment), config and tree helpers, audio / data /
models, the system (`system`: audio → BEATs → embedder → text states), then what uses it (`train`,
`sample`, `export`, `app`, `monitor`, `cli`), then `metrics`, then the entry points at the root.
"""

from __future__ import annotations

import ast
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = ("mtok_jax", "metrics", "configs", "train", "sample", "demo")
# Modules that build the system or use it: nothing below them may import them.
USERS = {"mtok_jax.system", "mtok_jax.train", "mtok_jax.sample", "mtok_jax.export", "mtok_jax.app",
         "mtok_jax.monitor", "mtok_jax.cli", "mtok_jax.checkpoints"}
LOW = ("mtok_jax.constants", "mtok_jax.errors", "mtok_jax.environment", "mtok_jax.config_utils", "mtok_jax.tree",
       "mtok_jax.params_io", "mtok_jax.pt_checkpoint", "mtok_jax.signals", "mtok_jax.workdir_lock",
       "mtok_jax.sharding", "mtok_jax.audio", "mtok_jax.models", "mtok_jax.data.sources", "mtok_jax.data.images",
       "mtok_jax.data.jobs", "mtok_jax.data.music_image", "mtok_jax.data.pipeline",
       "mtok_jax.torch_ref.fbank", "mtok_jax.torch_ref.beats", "mtok_jax.torch_ref.embedder")  # PyTorch references


def module_files() -> dict[str, pathlib.Path]:
    files = {}
    for path in [*REPO.glob("mtok_jax/**/*.py"), *REPO.glob("metrics/*.py"), *REPO.glob("configs/*.py"),
                 *(REPO / name for name in ("train.py", "sample.py", "demo.py"))]:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _target(module: str, name: str | None, known: set[str]) -> str:
    full = f"{module}.{name}" if name else module
    return full if full in known else module


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """→ ({module: first-party modules imported at module level}, ['file:line: import'] of first-party
    imports inside functions)."""
    files = module_files()
    known = set(files)
    graph, nested = {}, []
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FIRST_PARTY:
                targets = {_target(node.module, a.name, known) for a in node.names}
            elif isinstance(node, ast.Import):
                targets = {a.name for a in node.names if a.name.split(".")[0] in FIRST_PARTY}
            else:
                continue
            if not targets:
                continue
            if id(node) in in_function:
                nested.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
            edges |= {t for t in targets if t != module and t != "mtok_jax"}  # `import mtok_jax`: environment set-up
        graph[module] = edges
    return graph, nested


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def _below(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_cycle():
    graph, _ = import_graph()
    assert _cycles(graph) == []


def upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    upward = []
    for module, targets in graph.items():
        for target in targets:
            if module.startswith("configs") and not target.startswith("configs"):
                upward.append((module, target))  # configs are plain values
            if module.startswith("mtok_jax") and not target.startswith("mtok_jax"):
                upward.append((module, target))  # the package needs neither metrics nor the entry points
            if target.startswith("mtok_jax.demo") and module.startswith("mtok_jax") and not _below(
                    module, ("mtok_jax.demo", "mtok_jax.bench")):
                upward.append((module, target))  # the demo's models: for the demo, the benchmark and the tests
            if _below(module, LOW) and target in USERS:
                upward.append((module, target))
            if module.startswith("metrics") and target in ("train", "sample", "demo"):
                upward.append((module, target))
    return upward


def test_no_upward_edge():
    graph, _ = import_graph()
    assert upward_edges(graph) == []


def test_first_party_imports_at_the_top():
    _, nested = import_graph()
    assert nested == []


def test_the_graph_can_fail():
    """The checks see a planted upward edge and a planted cycle."""
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    planted = {"configs.demo": {"mtok_jax.models.beats"}, "mtok_jax.models.beats": {"mtok_jax.system"},
               "mtok_jax.sample": {"metrics.evaluate", "mtok_jax.demo.models"}, "mtok_jax.demo.data": {"mtok_jax.demo.models"}}
    assert sorted(upward_edges(planted)) == [("configs.demo", "mtok_jax.models.beats"),
                                             ("mtok_jax.models.beats", "mtok_jax.system"),
                                             ("mtok_jax.sample", "metrics.evaluate"),
                                             ("mtok_jax.sample", "mtok_jax.demo.models")]
    graph, _ = import_graph()
    assert "mtok_jax.models.hub" in graph["mtok_jax.models.text"]  # edges are found at all
    assert "mtok_jax.system" in graph["mtok_jax.train"]


if __name__ == "__main__":
    graph, nested = import_graph()
    for module in sorted(graph):
        print(f"{module} → {', '.join(sorted(graph[module])) or '-'}")
    print(f"\ncycles: {_cycles(graph) or 'none'}; first-party imports inside functions: {nested or 'none'}",
          file=sys.stderr)
