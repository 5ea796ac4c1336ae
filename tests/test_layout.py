"""The dependency direction of STYLE.md §2: no module imports a later link of the chain."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ase_race"
# Lower rank = closer to the leaves; a module may import only equal or lower ranks.
RANK = {
    "_keys": 0, "_atomic": 0, "errors": 0, "config": 1, "graph": 2, "nn": 3, "posteriors": 4,
    "modelfile": 5, "calculator": 6, "data": 2, "evaluation": 1, "training": 7,
    "active": 7, "stress": 7, "serve": 7, "cli": 9, "testing": 8, "__init__": 8,
}


def link(module_path: Path) -> str:
    rel = module_path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def imported_links(path: Path):
    tree = ast.parse(path.read_text())
    package_parts = path.relative_to(PACKAGE).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = list(package_parts[: len(package_parts) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
                if target:
                    yield target[0]
                else:
                    yield from (alias.name for alias in node.names)
            elif node.module and node.module.startswith("ase_race"):
                parts = node.module.split(".")[1:]
                yield parts[0] if parts else "__init__"


def test_no_upward_imports():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        here = link(path)
        for target in imported_links(path):
            if target in RANK and here in RANK and RANK[target] > RANK[here]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not bad, bad
