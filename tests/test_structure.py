"""The layout stays one place per concept: small modules, no private names used across modules, no import cycles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hf_prune"
MAX_LINES = 400
#: every pruned checkpoint carries these files as its remote code: they must load without hf_prune
REMOTE_CODE = ("modeling_pruned.py", "shapes.py", "channels.py")


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = _name(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_module_is_over_about_400_lines():
    long = {p.relative_to(PKG).as_posix(): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_no_private_name_is_imported_across_modules():
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and _resolve(path, node).startswith("hf_prune"):
                found += [f"{path.relative_to(PKG)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_no_import_cycle_between_modules():
    """Module-level imports only (imports inside functions are the deliberate way to defer a heavy dependency)."""
    graph: dict[str, set[str]] = {}
    names = {_name(p) for p in _modules()}
    for path in _modules():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                target = _resolve(path, node)
                for alias in node.names:  # "from . import x" may name a submodule
                    deps |= {t for t in (f"{target}.{alias.name}", target) if t in names}
        graph[_name(path)] = deps - {_name(path)}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for d in graph.get(n, ()):
            if d.startswith(n + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(d) == 1 and not n.startswith(d + "."):
                raise AssertionError(f"import cycle: {' -> '.join(stack + [n, d])}")
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])


def test_architecture_md_lists_every_module():
    """A newcomer reads ARCHITECTURE.md to find their file: every module is on it (a top-level ``x.py`` by name, a
    subpackage's module by its name on the subpackage's row)."""
    text = (PKG.parent / "ARCHITECTURE.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    missing = []
    for path in _modules():
        rel = path.relative_to(PKG)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        if len(rel.parts) == 1:
            if f"`{rel.name}`" not in text:
                missing.append(str(rel))
            continue
        row = next((line for key, line in rows.items() if f"`{rel.parts[0]}/`" in key), None)
        if row is None or (rel.name != "__init__.py" and f"`{rel.stem}`" not in row and f"`{rel.stem}." not in row):
            missing.append(str(rel))
    assert not missing, f"add these to ARCHITECTURE.md: {missing}"


def test_no_function_body_is_over_80_lines():
    """Long steps are split into named ones (the docstring does not count: explaining is not the problem)."""
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
                if (n := node.end_lineno - body[0].lineno + 1) > 80:
                    long.append(f"{path.relative_to(PKG)}:{node.name} ({n} lines)")
    assert not long, f"split these functions: {long}"


def test_remote_code_imports_only_torch_transformers_and_itself():
    allowed = {"torch", "transformers", "__future__"}
    for name in REMOTE_CODE:
        tree = ast.parse((PKG / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: only the other remote-code file
                assert f"{node.module}.py" in REMOTE_CODE, f"{name} imports .{node.module}: not in a checkpoint"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                roots = {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) else {
                    (node.module or "").split(".")[0]}
                assert all(r in allowed or r in sys.stdlib_module_names for r in roots), (name, roots)


def test_every_pruning_setting_has_its_help_text_in_its_metadata():
    from dataclasses import fields

    from hf_prune.config import PruningConfig

    assert [f.name for f in fields(PruningConfig) if not f.metadata.get("help")] == []


#: the only modules imported inside functions: optional extras (serving runtimes) and heavy imports kept off
#: ``import hf_prune`` (plots, LoRA, metrics); everything else is imported at the top of its module
LOCAL_IMPORTS = {"gguf", "llama_cpp", "onnx", "onnxruntime", "vllm", "matplotlib", "peft", "sklearn", "scipy", "deepspeed",
                 "sentence_transformers",
                 "evaluate", "pandas"}


def test_function_local_imports_are_only_optional_or_heavy_dependencies():
    found = []
    for path in _modules():
        if path.name in REMOTE_CODE:  # stands alone in a checkpoint
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    roots = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    roots = {"." * node.level + (node.module or "")} if node.level else {node.module.split(".")[0]}
                else:
                    continue
                found += [f"{path.relative_to(PKG)}:{node.lineno} {r}" for r in roots if r not in LOCAL_IMPORTS]
    assert not found, f"import these at module level: {found}"
