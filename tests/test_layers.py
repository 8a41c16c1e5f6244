"""The package's layers (docs/development.md): each module imports only from its own layer and
the ones listed before it, and the commands on top do not import each other."""

import ast
from pathlib import Path

import vae_lightning

LAYERS = ("errors", "files", "core", "data", "training", "evaluation", "launch", "config", "cli")
"""From the bottom up; every other top-level module is a command, above them all."""

PACKAGE = Path(vae_lightning.__file__).parent


def layer(module: str) -> int:
    top = module.split(".")[1]
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vae_lightning."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vae_lightning.")}
    return found


def test_each_module_imports_only_from_its_layer_and_those_below():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("vae_lightning", *path.relative_to(PACKAGE).with_suffix("").parts))
        for target in imported(path):
            command_to_command = (
                layer(module) == layer(target) == len(LAYERS)
                and module.split(".")[1] != target.split(".")[1]
            )
            if layer(target) > layer(module) or command_to_command:
                upward.append(f"{module} imports {target}")
    assert not upward, upward
