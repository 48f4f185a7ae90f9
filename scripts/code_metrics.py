"""Code metrics for a Python package, from its source alone (stdlib ``ast``, nothing imported).

Usage: python scripts/code_metrics.py [PACKAGE_DIR] [--json]     (PACKAGE_DIR defaults to ``harness``)

Measures:
  1. modules: every .py file under PACKAGE_DIR (recursively, __init__.py included), lines per file, total;
  2. function length: lines from ``def`` to ``end_lineno`` (decorators not counted), longest and top 5;
  3. parameters of public functions, methods and public classes' ``__init__`` (every parameter counts one,
     *args and **kwargs included, ``self``/``cls`` not); public = no ``_``-prefixed name on the path and not
     local to a function; click commands (a decorator whose text has "click." or ".command") reported apart;
  4. the internal import graph (top-level, function-local and ``if TYPE_CHECKING:`` imports, relative
     ones resolved; a type-only import is a dependency too, so it counts, and is also listed apart):
     cycles (SCCs larger than one; those that remain without the type-only imports, and among
     top-level imports only, are reported apart), layers (longest-path level on the condensation,
     L0 = imports no package module), and imports of another module's private names
     (``from pkg.x import _name`` and ``mod._name`` on an imported package module).
"""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path


def load(pkg_dir: Path) -> dict[str, tuple[Path, ast.Module, str]]:
    """Module name -> (path, tree, source) for every .py file under pkg_dir."""
    mods = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = list(path.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        src = path.read_text()
        mods[".".join(parts)] = (path, ast.parse(src, str(path)), src)
    return mods


def functions(mod: str, tree: ast.Module, src: str):
    """Yield (qualname, node, public, is_click) for every def, with its enclosing classes/functions."""
    def walk(node, prefix, public, in_func, cls_public):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                pub = public and not in_func and not child.name.startswith("_")
                yield from walk(child, prefix + [child.name], pub, in_func, pub)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = child.name
                pub = public and not in_func and (not name.startswith("_") or (name == "__init__" and cls_public))
                deco = [ast.get_source_segment(src, d) or "" for d in child.decorator_list]
                click = any("click." in d or ".command" in d for d in deco)
                yield f"{mod}:{'.'.join(prefix + [name])}", child, pub, click
                yield from walk(child, prefix + [name], pub, True, False)
            else:
                yield from walk(child, prefix, public, in_func, cls_public)
    yield from walk(tree, [], True, False, False)


def n_params(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x]
    return len([n for n in names if n not in ("self", "cls")])


def is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(mod: str, is_pkg: bool, tree: ast.Module, known: set[str], root: str):
    """(runtime edges, top-level-only runtime edges, type-only edges, private-name imports) of one module."""
    edges, top, typed, private, bound = set(), set(), set(), set(), {}
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for s in f.body for n in ast.walk(s)}
    typing_nodes = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and is_type_checking(i)
                    for s in i.body for n in ast.walk(s)}

    def nearest(name):  # the longest known module that `name` lies in
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def add(target, node):
        if target and target != mod:
            (typed if id(node) in typing_nodes else edges).add(target)
            if id(node) not in typing_nodes and id(node) not in local_nodes:
                top.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == root or a.name.startswith(root + "."):
                    add(nearest(a.name), node)
                    bound[a.asname or a.name] = nearest(a.name if a.asname else a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod if is_pkg else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            if not (base == root or base.startswith(root + ".")):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    add(sub, node)
                    bound[a.asname or a.name] = sub
                else:
                    add(nearest(base), node)
                    if a.name.startswith("_") and not a.name.startswith("__") and nearest(base) != mod:
                        private.add(f"{base}.{a.name}")
    for node in ast.walk(tree):  # mod._name on a bound package module (or a dotted pkg.x._name)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            target = bound.get(ast.unparse(node.value))
            if target is None and ast.unparse(node.value) in known:
                target = ast.unparse(node.value)
            if target and target != mod and f"{target}.{node.attr}" not in known:
                private.add(f"{target}.{node.attr}")
    return edges, top, typed - edges, private


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop()), on.discard(comp[-1])
            out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Longest-path level of each module on the condensation (0 = no outgoing edge)."""
    comp_of = {v: i for i, c in enumerate(sccs(graph)) for v in c}
    level: dict[int, int] = {}

    def lv(c):
        if c not in level:
            succ = {comp_of[w] for v in graph if comp_of[v] == c for w in graph[v]} - {c}
            level[c] = 1 + max(map(lv, succ)) if succ else 0
        return level[c]
    return {v: lv(comp_of[v]) for v in graph}


def measure(pkg_dir: Path) -> dict:
    mods = load(pkg_dir)
    root, known = pkg_dir.name, set(mods)
    fns, graph, runtime, top, typed, private = [], {}, {}, {}, {}, []
    for mod, (path, tree, src) in mods.items():
        fns += functions(mod, tree, src)
        runtime[mod], top[mod], typed[mod], pv = imports(mod, path.name == "__init__.py", tree, known, root)
        graph[mod] = runtime[mod] | typed[mod]
        private += [f"{mod} -> {x}" for x in sorted(pv)]
    lengths = sorted(((n.end_lineno - n.lineno + 1, q) for q, n, _, _ in fns), key=lambda x: (-x[0], x[1]))
    public = sorted(((n_params(n), q) for q, n, p, c in fns if p and not c), key=lambda x: (-x[0], x[1]))
    click = sorted(((n_params(n), q) for q, n, p, c in fns if c), key=lambda x: (-x[0], x[1]))
    cycles = [c for c in sccs(graph) if len(c) > 1]
    lv = levels(graph)
    return {
        "package": str(pkg_dir), "module_count": len(mods),
        "lines": {m: len(s.splitlines()) for m, (_, _, s) in sorted(mods.items(), key=lambda x: str(x[1][0]))},
        "longest_functions": [{"name": q, "lines": n} for n, q in lengths[:5]],
        "top_params": [{"name": q, "params": n} for n, q in public[:5]],
        "public_over_6_params": sum(n > 6 for n, _ in public), "public_functions": len(public),
        "click_commands_excluded": [{"name": q, "params": n} for n, q in click],
        "imports": {m: sorted(graph[m]) for m in sorted(graph)},
        "type_checking_only_imports": {m: sorted(t) for m, t in sorted(typed.items()) if t},
        "cycles": cycles, "runtime_cycles": [c for c in sccs(runtime) if len(c) > 1],
        "top_level_cycles": [c for c in sccs(top) if len(c) > 1],
        "levels": lv, "level_count": max(lv.values()) + 1 if lv else 0, "private_imports": private,
    }


def report(d: dict) -> str:
    out = [f"package: {d['package']}", f"modules: {d['module_count']}"]
    width = max(map(len, d["lines"]))
    out += [f"  {m:<{width}} {n:>5}" for m, n in d["lines"].items()]
    out += [f"  {'total':<{width}} {sum(d['lines'].values()):>5}", "", "longest functions (def .. end):"]
    out += [f"  {f['lines']:>4}  {f['name']}" for f in d["longest_functions"]]
    out += ["", f"most parameters, public functions/methods/constructors ({d['public_functions']} counted):"]
    out += [f"  {f['params']:>4}  {f['name']}" for f in d["top_params"]]
    out += [f"  public functions with > 6 parameters: {d['public_over_6_params']}",
            f"click commands (excluded): {len(d['click_commands_excluded'])}"]
    out += [f"  {f['params']:>4}  {f['name']}" for f in d["click_commands_excluded"]]
    out += ["", "internal imports (top-level + function-local + TYPE_CHECKING):"]
    out += [f"  {m} -> {', '.join(t) or '-'}" for m, t in d["imports"].items()]
    for m, t in d["type_checking_only_imports"].items():
        out.append(f"  (of which TYPE_CHECKING only) {m} -> {', '.join(t)}")
    out += ["", f"import cycles: {len(d['cycles']) or 'none'}"]
    out += [f"  {{{', '.join(c)}}}" for c in d["cycles"]]
    out.append(f"  of which without the TYPE_CHECKING imports: {len(d['runtime_cycles']) or 'none'}")
    out += [f"    {{{', '.join(c)}}}" for c in d["runtime_cycles"]]
    out.append(f"  of which among top-level imports only: {len(d['top_level_cycles']) or 'none'}")
    out += [f"    {{{', '.join(c)}}}" for c in d["top_level_cycles"]]
    cond = " (on the condensation: a cycle's modules share a level)" if d["cycles"] else ""
    out += ["", f"layers: {d['level_count']}{cond}"]
    for lvl in range(d["level_count"] - 1, -1, -1):
        out.append(f"  L{lvl}: {', '.join(sorted(m for m, v in d['levels'].items() if v == lvl))}")
    out += ["", f"private-name imports: {len(d['private_imports']) or 'none'}"]
    out += [f"  {p}" for p in d["private_imports"]]
    return "\n".join(out)


def main(argv: list[str]) -> None:
    args = [a for a in argv if a != "--json"]
    d = measure(Path(args[0] if args else "harness").resolve())
    print(json.dumps(d, indent=2) if "--json" in argv else report(d))


if __name__ == "__main__":
    main(sys.argv[1:])
