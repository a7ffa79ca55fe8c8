"""The package's imports run one way (docs/architecture.md): read every module's imports with `ast`, those
inside function bodies too, and fail on an import cycle or on an import from a lower floor to a higher one."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nanodiffusion"
# Floors, lowest first: a module imports from its own floor (its own package, or a lone module of that floor)
# or from lower ones. Packages of one floor do not import each other.
FLOORS = [
    {"nanodiffusion", "errors"},            # "nanodiffusion": the package's __init__
    {"config", "atomic", "validation"},
    {"images", "tokenizer"},
    {"nets", "diffusion", "data", "control_images"},
    {"weights"},
    {"adapters"},
    {"pipelines"},
    {"evaluation"},
    {"training", "server"},
    {"commands", "builtin"},
    {"cli"},
    {"__main__"},
]
FLOOR_OF = {part: level for level, parts in enumerate(FLOORS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` that `path` imports, wherever the import statement stands (but under
    `if TYPE_CHECKING:`, which never runs).

    `from package import module` imports that module (its package's __init__ runs for any of its modules and
    is not counted); `from module import name` imports the module.
    """
    found = set()
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules


def _nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (child for statement in node.orelse for child in [statement, *_nodes(statement)])
            continue
        yield node
        yield from _nodes(node)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(modules)) - {name} for name, path in modules.items()}


def floor(module: str) -> tuple[int, str]:
    """(floor, unit): the unit is the sub-package ("nanodiffusion.nets") or the lone module."""
    part = module.split(".")[1] if "." in module else "nanodiffusion"
    return FLOOR_OF[part], ".".join(module.split(".")[:2])


def test_every_part_of_the_package_has_a_floor():
    assert {floor(module)[0] for module in import_graph()} <= set(range(len(FLOORS)))


def test_no_import_goes_up_or_sideways():
    wrong = []
    for module, targets in import_graph().items():
        level, unit = floor(module)
        for target in targets:
            target_level, target_unit = floor(target)
            if target_level > level or (target_level == level and target_unit != unit
                                        and target_unit != "nanodiffusion"):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering of docs/architecture.md:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = import_graph()
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: on a made-up package with both faults they do."""
    package = tmp_path / "nanodiffusion"
    for name, text in {"__init__.py": "", "nets/__init__.py": "", "pipelines/__init__.py": "",
                       "nets/a.py": "def f():\n    from nanodiffusion.nets import b\n",
                       "nets/b.py": "from nanodiffusion.nets.a import f\n"
                                    "from nanodiffusion.pipelines import p\n",
                       "pipelines/p.py": ""}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    cycle = "nanodiffusion.nets.a -> nanodiffusion.nets.b -> nanodiffusion.nets.a"
    with pytest.raises(AssertionError, match=f"import cycle: {cycle}"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="nanodiffusion.nets.b -> nanodiffusion.pipelines.p"):
        test_no_import_goes_up_or_sideways()


def test_the_package_and_the_command_list_load_without_torch():
    """`import nanodiffusion` and `nanodiffusion --help` import no command module and so not torch (the
    top-level names are imported on first use)."""
    code = ("import sys, nanodiffusion, nanodiffusion.cli\n"
            "nanodiffusion.cli.build_parser(set()).format_help()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert nanodiffusion.DDPMPipeline.__name__ == 'DDPMPipeline' and 'torch' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=PACKAGE.parent)
