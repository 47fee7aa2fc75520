"""The package's layers, read from its source: imports run one way (kernels at the bottom, then the MoE layer, GPTQ,
loading, the model, registration), without cycles, and no function-local import stands in for a module-level one
except for optional dependencies. docs/architecture.md draws the same picture."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qwen2_moe_hf")
PKG = "qwen2_moe_hf"

# What each part may import from the package (a prefix matches the module and its submodules). The top-level
# entry points (__init__, cli, chat, demo, and the tools bench, serve, lora) may import anything.
ALLOWED = {
    "kernels": ["kernels"],
    "moe": ["moe", "kernels"],
    "gptq": ["gptq", "kernels", "moe.weights", "files", "compat"],
    "files": [],
    "compat": [],
    "loading": ["loading", "gptq", "files", "compat"],
    "configuration_qwen2_moe": ["compat", "files"],
    "modeling_qwen2_moe": ["compat", "configuration_qwen2_moe", "loading", "moe"],
    "registration": ["compat", "configuration_qwen2_moe", "modeling_qwen2_moe"],
}
TOP = ("", "cli", "chat", "demo", "bench", "bench_llamacpp", "to_gguf", "serve", "lora")
# Function-local imports are for optional dependencies only: importing them at module level would make them
# required (triton also fixes its interpreter mode when imported, which the tests set first; the ninja package is a
# dependency, but a system ninja serves as well, so the builder looks for the package only when none is on PATH).
# The tools' own optional dependencies: peft (lora), matplotlib (bench --plot), transformers' server and its click
# (serve, 5.x only), transformers' built-in qwen2_moe (bench's comparison, 5.x only).
# gguf and llama_cpp: bench --vs-llamacpp's (the llamacpp extra).
OPTIONAL = ("flash_attn", "ninja", "nvidia", "triton", f"{PKG}.kernels.triton_moe", "peft", "matplotlib", "click",
            "transformers.cli", "transformers.models.qwen2_moe", "gguf", "llama_cpp")
# Modules whose imports are all function-local by design, and why.
LOCAL_BY_DESIGN = {
    "bench_llamacpp": "its measuring children run this file by path: the built-in row's process must never import "
                      "the plugin, and each child sets the environment and torch's threads before importing torch",
}


def _modules():
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                rel = rel[: -len("__init__")].rstrip(".") if rel.endswith("__init__") else rel
                found[rel] = path
    return found


MODULES = _modules()


def _imports(rel):
    """[(imported package-relative module or external name, is_local, line)] of one module."""
    path = MODULES[rel]
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = rel.split(".") if path.endswith("__init__.py") else rel.split(".")[:-1]
    package = [p for p in package if p]
    out = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - child.level + 1] + ([child.module] if child.module else [])
                    base = ".".join(base)
                    subs = [f"{base}.{a.name}".lstrip(".") for a in child.names
                            if f"{base}.{a.name}".lstrip(".") in MODULES]
                    targets = subs + ([base] if len(subs) < len(child.names) else [])
                    out.extend((t, local, child.lineno, True) for t in targets)
                else:
                    out.append((child.module, local, child.lineno, False))
            elif isinstance(child, ast.Import):
                out.extend((a.name, local, child.lineno, False) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return out


def _part(rel):
    return rel.split(".")[0]


def _under(name, prefix):
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("rel", sorted(MODULES))
def test_imports_follow_the_layers(rel):
    if _part(rel) in TOP:
        return
    allowed = ALLOWED[_part(rel)]
    for target, _, line, internal in _imports(rel):
        if internal or target.startswith(PKG):
            target = target[len(PKG) + 1:] if target.startswith(PKG) else target
            assert any(_under(target, a) for a in allowed), (
                f"{rel} line {line} imports {target}: {_part(rel)} may import only {allowed}")


@pytest.mark.parametrize("rel", sorted(MODULES))
def test_function_local_imports_are_optional_dependencies(rel):
    if rel in LOCAL_BY_DESIGN:
        return
    for target, local, line, internal in _imports(rel):
        if local:
            name = f"{PKG}.{target}" if internal else target
            assert any(_under(name, o) for o in OPTIONAL), f"{rel} line {line}: function-local import of {name}"


def test_no_import_cycles():
    graph = {rel: {t for t, local, _, internal in _imports(rel) if internal and not local} for rel in MODULES}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt not in graph or nxt == node and MODULES[node].endswith("__init__.py"):
                continue
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for rel in sorted(graph):
        if rel not in state:
            visit(rel, [rel])


def test_backends_read_int4_through_the_interface():
    """The MoE layer knows 4-bit weights only as moe.weights.Int4Projection: no GPTQLinear, no `.bits`."""
    for rel in (r for r in MODULES if _part(r) == "moe"):
        tree = ast.parse(open(MODULES[rel], encoding="utf-8").read())
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Name) and node.id == "GPTQLinear"), f"{rel}: names GPTQLinear"
            assert not (isinstance(node, ast.Attribute) and node.attr == "bits"), f"{rel} line {node.lineno}: .bits"
            assert not (isinstance(node, ast.Constant) and node.value == "bits"), f"{rel} line {node.lineno}: 'bits'"


def test_the_rules_see_a_violation(tmp_path, monkeypatch):
    """The checker itself: a kernels module importing the MoE layer, a local import and a cycle are all caught."""
    fake = {"kernels.bad": tmp_path / "bad.py", "moe.a": tmp_path / "a.py", "moe.b": tmp_path / "b.py"}
    fake["kernels.bad"].write_text("from ..moe import weights\n\ndef f():\n    from . import ops\n")
    fake["moe.a"].write_text("from . import b\n")
    fake["moe.b"].write_text("from . import a\n")
    monkeypatch.setattr(__import__(__name__), "MODULES", {**{k: str(v) for k, v in fake.items()},
                                                         "moe.weights": MODULES["moe.weights"],
                                                         "kernels.ops": MODULES["kernels.ops"]})
    with pytest.raises(AssertionError, match="kernels may import only"):
        test_imports_follow_the_layers("kernels.bad")
    with pytest.raises(AssertionError, match="function-local import of qwen2_moe_hf.kernels.ops"):
        test_function_local_imports_are_optional_dependencies("kernels.bad")
    with pytest.raises(AssertionError, match="import cycle: moe.a -> moe.b -> moe.a"):
        test_no_import_cycles()
