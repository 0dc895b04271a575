"""Imports run one way (DESIGN.md, "Layers"): entry points -> package -> optimizer -> its parts ->
functional -> backends -> step driver -> ops -> kernel sets -> kernels, with the records, tables,
reference engine and ABI below them all; every module of the package has a layer. The graph is read
from the source (every import statement, also those inside functions, and the kernel sets that
kernel_sets loads by name), so a circle fails here before it fails at some user's import."""
import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "epi_kernels"

# Rank of each layer, top (0) to bottom: an import may only go to a higher rank, or within its own
# layer (without a circle). A module belongs to the entry of its longest prefix (a package's entry
# covers its submodules).
LAYERS = (
    ("epi_kernels.__main__", "epi_kernels.experiments", "epi_kernels.integrations"),  # entry points
    ("epi_kernels",),  # the package: what `import epi_kernels` gives
    ("epi_kernels.optimizer",),
    ("epi_kernels.settings", "epi_kernels.layouts", "epi_kernels.group_record", "epi_kernels.schedule",
     "epi_kernels.grad_scaler", "epi_kernels.loading"),  # the optimizer's parts
    ("epi_kernels.functional",),
    ("epi_kernels.backends",),  # the registry and one module per backend
    ("epi_kernels.step_driver",),
    ("epi_kernels.ops",),
    ("epi_kernels.kernel_sets",),
    ("epi_kernels.kernel_sets.triton_kernels", "epi_kernels.kernel_sets.cuda_kernels"),
    ("epi_kernels.kernels",),
    ("epi_kernels.launch", "epi_kernels.step_records", "epi_kernels.step_scalars"),  # records and tables
    ("epi_kernels.partitions", "epi_kernels.state", "epi_kernels.sharding", "epi_kernels.refresh",
     "epi_kernels.mask", "epi_kernels.score", "epi_kernels.normalise"),  # reference refresh, sharding, state
    ("epi_kernels.threshold",),
    ("epi_kernels.abi",),
)
RANKS = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The epi_kernels modules `name` imports (the modules, not the packages above them)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from . import ops`: the module ops
    if name == "epi_kernels.kernel_sets":  # loaded by name (importlib), not by an import statement
        from epi_kernels.kernel_sets import NAMES

        found.update(f"epi_kernels.kernel_sets.{m}_kernels" for m in NAMES)
    # a module's own packages are imported before it whatever it says: not an edge of its own
    return {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> str | None:
    """The RANKS entry `name` belongs to (the longest prefix), or None."""
    return next((p for p in sorted(RANKS, key=len, reverse=True) if name == p or name.startswith(p + ".")), None)


def test_the_graph_is_read():
    # the reader finds the chain the layers promise (a reader that finds nothing passes everything)
    assert "epi_kernels.functional" in GRAPH["epi_kernels.optimizer"]
    assert "epi_kernels.step_driver" in GRAPH["epi_kernels.functional"]
    assert "epi_kernels.ops" in GRAPH["epi_kernels.step_driver"]
    assert "epi_kernels.kernel_sets" in GRAPH["epi_kernels.ops"]
    assert "epi_kernels.kernel_sets.triton_kernels" in GRAPH["epi_kernels.kernel_sets"]
    assert "epi_kernels.kernels.fused_step" in GRAPH["epi_kernels.kernel_sets.triton_kernels"]
    assert "epi_kernels.abi" in GRAPH["epi_kernels.kernels.tensor_table"]


def test_every_module_has_a_layer():
    unranked = sorted(name for name in MODULES if _layer(name) is None)
    assert not unranked, f"modules in no layer of LAYERS: {unranked}"
    assert len(MODULES) > 30


def test_the_backends_are_found_by_the_reader():
    # each backend registers itself in a module of its own, imported by the package's one line
    assert {"epi_kernels.backends.eager", "epi_kernels.backends.compiled", "epi_kernels.backends.triton",
            "epi_kernels.backends.cuda"} <= GRAPH["epi_kernels.backends"]
    assert "epi_kernels.step_driver" in GRAPH["epi_kernels.backends.triton"]


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [name, dep] if dep in path else [name, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [name])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])


def test_imports_point_down_the_layers():
    # within one layer (the Triton kernels' helpers) anything goes but a circle
    upward = [(a, b) for a, deps in GRAPH.items() for b in deps
              if _layer(a) and _layer(b) and RANKS[_layer(a)] > RANKS[_layer(b)]]
    assert not upward, f"imports against the layer order: {upward}"


def _importable(name: str) -> bool:
    needs = {"epi_kernels.kernels": "triton", "epi_kernels.kernel_sets.triton_kernels": "triton",
             "epi_kernels.kernel_sets.cuda_kernels": "epi_kernels._C", "epi_kernels.experiments": "transformers",
             "epi_kernels.integrations": "transformers"}
    return all(importlib.util.find_spec(dep) is not None for prefix, dep in needs.items()
               if name == prefix or name.startswith(prefix + "."))


def test_each_module_imports_alone():
    # one interpreter; before each module, every epi_kernels module is forgotten, so each import
    # starts from nothing of ours (third-party modules stay loaded: they are not what is tested)
    names = [n for n in MODULES if _importable(n) and not n.endswith("__main__")]
    assert len(names) > 20
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'epi_kernels' or m.startswith('epi_kernels.')]:\n"
        "        if m != 'epi_kernels._C':\n"  # an extension module cannot be loaded twice
        "            del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        sys.exit(f'{name}: {type(e).__name__}: {e}')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
