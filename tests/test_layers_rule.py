"""The package's import layering (DESIGN.md "Layers"): imports point down, at module level, with no circle.

Lowest first. A module may import its own layer or a lower one; importing a higher layer, an import circle of any
length, or an intra-package import inside a function (outside the CLI and the lazy package ``__init__``) fails here.
"""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PKG = Path(__file__).resolve().parents[1] / 'eobackbones'

# module (dotted, without the package name) or package prefix -> layer; the longest matching prefix wins
LAYERS = {
    'errors': 0, 'version': 0, 'env': 0, '_io': 0, 'precision': 0,
    'sensors': 1,
    'spec': 2,
    'cfg': 3,
    'hub': 4,
    'layers': 5, 'heads': 5,
    'models': 6,
    'transforms': 7, 'pretrain': 7, 'optimize': 7, 'bench': 7, 'eval': 7, 'data': 7, 'finetune': 7,
    'integrations': 7,
    'cli': 8,
}
# function-level intra-package imports buy start-up time only here
LAZY_OK = {'cli', ''}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix('')
    parts = list(rel.parts)
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(parts)


def _layer(mod: str) -> int:
    best = None
    for prefix, layer in LAYERS.items():
        if mod == prefix or mod.startswith(prefix + '.'):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    assert best is not None, f'module {mod!r} has no layer in tests/test_layers_rule.py: add it to LAYERS'
    return best[1]


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> List[str]:
    """Targets (dotted, inside the package) of a ``from ... import ...`` statement."""
    if node.level == 0:
        if not (node.module or '').startswith('eobackbones'):
            return []
        base = node.module[len('eobackbones'):].lstrip('.')
    else:
        parts = mod.split('.') if mod else []
        if not is_pkg:
            parts = parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
        base = '.'.join(parts + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        cand = f'{base}.{alias.name}' if base else alias.name
        out.append(cand if (PKG / (cand.replace('.', '/') + '.py')).is_file() or (PKG / cand.replace('.', '/')).is_dir()
                   else base)
    return [o for o in out if o]


def _imports() -> Tuple[Dict[str, Set[str]], List[str]]:
    graph: Dict[str, Set[str]] = {}
    lazy: List[str] = []
    for path in sorted(PKG.rglob('*.py')):
        mod = _module_name(path)
        tree = ast.parse(path.read_text(encoding='utf-8'))
        is_pkg = path.name == '__init__.py'
        top = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                top.update(_resolve(mod, is_pkg, node))
            elif isinstance(node, ast.Import):
                top.update(a.name[len('eobackbones.'):] for a in node.names if a.name.startswith('eobackbones.'))
        graph[mod] = {t for t in top if t != mod}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or '').startswith('eobackbones')):
                        if mod not in LAZY_OK:
                            lazy.append(f'{mod}:{inner.lineno} from {"." * inner.level}{inner.module or ""}')
    return graph, lazy


GRAPH, LAZY = _imports()


def test_every_module_has_a_layer():
    for mod in GRAPH:
        if mod:
            _layer(mod)


def test_imports_point_down():
    up = []
    for mod, targets in GRAPH.items():
        if not mod:
            continue  # the package __init__ re-exports lazily (PEP 562)
        for t in targets:
            if t and _layer(t) > _layer(mod):
                up.append(f'{mod} (layer {_layer(mod)}) imports {t} (layer {_layer(t)})')
    assert not up, '\n'.join(up)


def test_no_import_circle():
    # a module imports its package's __init__ implicitly; an edge to a package means its __init__
    def deps(m: str) -> Set[str]:
        return {t for t in GRAPH.get(m, ()) if t in GRAPH and t != m and not m.startswith(t + '.')}
    seen, stack, on_stack, cycles = set(), [], set(), []

    def visit(m: str) -> None:
        seen.add(m)
        stack.append(m)
        on_stack.add(m)
        for t in deps(m):
            if t in on_stack:
                cycles.append(' -> '.join(stack[stack.index(t):] + [t]))
            elif t not in seen:
                visit(t)
        stack.pop()
        on_stack.discard(m)
    for m in GRAPH:
        if m and m not in seen:
            visit(m)
    assert not cycles, '\n'.join(cycles)


def test_intra_package_imports_are_at_module_level():
    assert not LAZY, 'function-level imports (allowed only in the CLI):\n' + '\n'.join(LAZY)


@pytest.mark.parametrize('target, forbidden', [
    ('eobackbones.hub', ('eobackbones.models', 'eobackbones.layers', 'timm')),
    ('eobackbones', ('eobackbones.models', 'eobackbones.hub', 'torch')),
    ('eobackbones.spec', ('eobackbones.models', 'eobackbones.hub')),
])
def test_light_imports(target, forbidden):
    """``import eobackbones.hub`` builds no model family (the loader needs none of them)."""
    code = f'import sys; import {target}; print("\\n".join(sorted(sys.modules)))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    bad = sorted({m for m in out for f in forbidden if m == f or m.startswith(f + '.')})
    assert not bad, f'import {target} imported {bad[:8]}'
