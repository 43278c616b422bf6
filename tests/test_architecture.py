"""The shape of the package: layered packages, no import cycles, small modules, no MPI in the
network.

These are the promises a new contributor reads the code by (docs/design.md#reading-the-code): each
package imports only those below it, so any module can be read knowing only what lies beneath.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ddptrain"

# From the bottom up: a module may import its own package and those before it, never one after it.
LAYERS = ["errors", "files", "durable", "backends", "nn", "optim", "distributed", "data",
          "training", "run", "api", "verification", "commands", "export", "supervisor",
          "verify_command", "plot", "cli",
          "__main__"]
MAX_LINES = 420


def modules():
    """``{dotted name: path}`` of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path, known, top_level_only):
    """The package's modules that ``path`` imports (at the top of the file only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for candidate in [node.module] + [f"{node.module}.{alias.name}"
                                              for alias in node.names]:
                if candidate in known:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
    return found


def layer_of(module):
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_module_imports_one_from_a_package_above_its_own():
    known = modules()
    upward = [(module, imported) for module, path in known.items()
              for imported in imports(path, known, False)
              if layer_of(module) is not None and layer_of(imported) is not None
              and layer_of(imported) > layer_of(module)]
    assert upward == []


def test_the_imports_between_modules_have_no_cycle():
    known = modules()
    graph = {module: {imported for imported in imports(path, known, True)
                      # a package's __init__ importing its own modules
                      if not imported.startswith(module + ".")}
             for module, path in known.items()}
    visiting, done, cycles = set(), set(), []

    def visit(module, stack):
        visiting.add(module)
        for imported in graph[module]:
            if imported in visiting:
                cycles.append(stack[stack.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, stack + [imported])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        if module not in done:
            visit(module, [module])
    assert cycles == []


def test_every_module_is_short_enough_to_read_in_one_sitting():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_only_the_communicator_module_imports_mpi4py_and_the_network_knows_nothing_of_ranks():
    for name, path in modules().items():
        text = path.read_text()
        if name != "ddptrain.distributed.comm":
            assert ("mpi4py" not in text
                    or "import mpi4py" not in text and "from mpi4py" not in text), name
        if name.startswith(("ddptrain.nn", "ddptrain.optim")):
            tree = ast.parse(text)
            imported = {node.module for node in ast.walk(tree)
                        if isinstance(node, ast.ImportFrom) and node.module}
            assert not any(module.startswith("ddptrain.distributed") for module in imported), name


def test_only_rank_0_s_module_imports_tensorboardx_and_only_when_it_writes_events():
    """tensorboardX is an optional extra that rank 0 alone loads (for --tensorboard): imported
    inside a function of run/rank0.py, never at the top of a module, so that no other rank and no
    run without --tensorboard loads it."""
    importers = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            found = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [])
            if any(module.split(".")[0] == "tensorboardX" for module in found):
                importers.setdefault(name, []).append(node in tree.body)
    assert importers == {"ddptrain.run.rank0": [False, False, False]}


def test_the_training_step_knows_the_gradient_exchange_only_by_its_interface():
    """One step for every exchange: TrainStep calls the exchange's methods and names none of its
    variants (the variant is chosen once, by distributed.exchange.make_exchange)."""
    tree = ast.parse((PACKAGE / "training" / "step.py").read_text())
    step = next(node for node in tree.body if isinstance(node, ast.ClassDef)
                and node.name == "TrainStep")
    names = {node.id for node in ast.walk(step) if isinstance(node, ast.Name)}
    attributes = {node.attr for node in ast.walk(step) if isinstance(node, ast.Attribute)}
    variants = {"Allreduce", "BucketedAllreduce", "ReduceScatter", "NodeSharedMemory",
                "ShardedOptimizer", "NodeMemory", "GradientBuckets", "sharded", "buckets"}
    assert (names | attributes) & variants == set()
    assert "isinstance" not in names
    interface = {"during_backward", "reduce_", "owned", "norm_share", "global_norm", "publish_"}
    assert interface <= attributes
