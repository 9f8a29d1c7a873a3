"""The event catalogue (audit/catalogue.py) is exactly the set of types the code records.

The source of every app is read (not imported): each call that records an event
(``event_record(type=...)``, ``EventSpec(tenant, type, ...)``) is found, and its type is
followed to the string literals it can be: a literal, a conditional, a module-level
constant or dict, a loop over literal tuples, a variable assigned in the function, or a
parameter (then to every call of that function). An f-string is expanded from the table
below, so a new dynamic type must be listed here too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from audit.catalogue import EVENT_TYPES, event_type_pattern_known

ROOT = Path(__file__).resolve().parents[2]
_SKIPPED_PARTS = {".venv", "var", "node_modules", "tests", "migrations", "bench", "scripts", "docs", "static"}
_RECORDERS = {"event_record": 1, "EventSpec": 1}  # name -> position of `type` after the tenant
_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+")

# f-strings that make a type, and every type each can make.
FORMATTED = {
    # outbound.delivery._record: an attempt's Outcome state (delivered, deferred or bounced).
    "outbound.{}": {"outbound.delivered", "outbound.deferred", "outbound.bounced"},
}


@dataclass
class _Module:
    path: Path
    tree: ast.Module
    parents: dict[ast.AST, ast.AST] = field(default_factory=dict)


def _modules() -> list[_Module]:
    modules = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if set(relative.parts) & _SKIPPED_PARTS or relative.name in {"conftest.py", "testing.py"}:
            continue
        module = _Module(path, ast.parse(path.read_text(), str(path)))
        for node in ast.walk(module.tree):
            for child in ast.iter_child_nodes(node):
                module.parents[child] = node
        modules.append(module)
    return modules


def _name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    for item in call.keywords:
        if item.arg == keyword:
            return item.value
    return call.args[position] if len(call.args) > position else None


def _functions(module: _Module, node: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The functions around ``node``, innermost first."""
    while node in module.parents:
        node = module.parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


class _Resolver:
    def __init__(self, modules: list[_Module]) -> None:
        self.modules = modules
        self.unresolved: list[str] = []

    def values(self, module: _Module, expr: ast.expr, depth: int = 0) -> set[str]:
        where = f"{module.path.relative_to(ROOT)}:{expr.lineno}"
        if depth > 6:
            self.unresolved.append(f"{where}: too deep")
            return set()
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if isinstance(expr, ast.JoinedStr):
            shape = "".join(str(part.value) if isinstance(part, ast.Constant) else "{}" for part in expr.values)
            if shape not in FORMATTED:
                self.unresolved.append(f"{where}: f-string {shape!r} is not in FORMATTED")
            return set(FORMATTED.get(shape, ()))
        if isinstance(expr, ast.IfExp):
            return self.values(module, expr.body, depth + 1) | self.values(module, expr.orelse, depth + 1)
        if isinstance(expr, ast.Dict):
            return set().union(*(self.values(module, value, depth + 1) for value in expr.values))
        if isinstance(expr, ast.Subscript):  # a constant dict's values
            return self.values(module, expr.value, depth + 1)
        if isinstance(expr, ast.Name):
            return self._name(module, expr, depth)
        self.unresolved.append(f"{where}: {ast.dump(expr)[:80]}")
        return set()

    def _name(self, module: _Module, expr: ast.Name, depth: int) -> set[str]:
        for function in _functions(module, expr):
            found = self._assigned(module, function, expr.id, depth)
            if found is not None:
                return found
            parameters = [argument.arg for argument in function.args.args]
            if expr.id in parameters:
                return self._passed(function.name, parameters.index(expr.id), expr.id, depth)
        for candidate in [module, *self.modules]:  # the module's constant, or an imported one
            found = self._assigned(candidate, candidate.tree, expr.id, depth, top_level=True)
            if found is not None:
                return found
        self.unresolved.append(f"{module.path.relative_to(ROOT)}:{expr.lineno}: name {expr.id}")
        return set()

    def _assigned(
        self, module: _Module, scope: ast.AST, name: str, depth: int, *, top_level: bool = False
    ) -> set[str] | None:
        nodes = ast.iter_child_nodes(scope) if top_level else ast.walk(scope)
        found: set[str] | None = None
        for node in nodes:
            values: set[str] | None = None
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(target, ast.Name) and target.id == name for target in targets):
                    values = self.values(module, node.value, depth + 1)
            elif isinstance(node, ast.For) and isinstance(node.target, ast.Tuple):
                names = [item.id if isinstance(item, ast.Name) else None for item in node.target.elts]
                if name in names and isinstance(node.iter, ast.Tuple | ast.List):
                    index = names.index(name)
                    values = set()
                    for row in node.iter.elts:
                        assert isinstance(row, ast.Tuple), ast.dump(row)
                        values |= self.values(module, row.elts[index], depth + 1)
            if values is not None:
                found = (found or set()) | values
        return found

    def _passed(self, function: str, position: int, keyword: str, depth: int) -> set[str]:
        found: set[str] = set()
        for module in self.modules:
            for node in ast.walk(module.tree):
                if isinstance(node, ast.Call) and _name(node) == function:
                    argument = _argument(node, position, keyword)
                    if argument is not None:
                        found |= self.values(module, argument, depth + 1)
        return found


def recorded_types() -> tuple[set[str], list[str]]:
    """Every type the source can record, and what could not be followed."""
    modules = _modules()
    resolver = _Resolver(modules)
    found: set[str] = set()
    for module in modules:
        if module.path == ROOT / "audit" / "services.py":
            continue  # the recorder itself: event_record hands its own parameter on
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Call) or _name(node) not in _RECORDERS:
                continue
            argument = _argument(node, _RECORDERS[str(_name(node))], "type")
            if argument is None:
                continue
            found |= resolver.values(module, argument)
    return {value for value in found if value}, resolver.unresolved


def test_it_lists_exactly_the_types_the_code_records():
    found, unresolved = recorded_types()
    assert unresolved == []
    assert len(found) >= 25  # the scan saw the whole platform, not a corner of it
    assert {name for name in found if not _EVENT_TYPE.fullmatch(name)} == set()
    assert sorted(found - set(EVENT_TYPES)) == [], "recorded but not in audit/catalogue.py"
    assert sorted(set(EVENT_TYPES) - found) == [], "in audit/catalogue.py but never recorded"


def test_it_knows_the_types_of_the_contract_and_the_docs():
    """DESIGN's contract names these; docs/webhooks.md's table lists every one of them."""
    contract = {
        "ingest.received", "objectstore.uploaded", "indexer.indexed", "message.quarantined", "message.deleted",
        "webhook.delivered", "webhook.failed", "domain.verified", "domain.mx_lost", "domain.mx_restored",
        "domain.suspended", "mailbox.created", "mailbox.expired", "connector.connected", "connector.error",
        "connector.auth_failed", "binding.created", "binding.reassigned", "binding.released", "outbound.queued",
        "outbound.delivered", "outbound.deferred", "outbound.bounced",
    }  # fmt: skip
    assert contract <= set(EVENT_TYPES)
    documented = (ROOT / "docs" / "webhooks.md").read_text()
    assert [name for name in EVENT_TYPES if f"`{name}`" not in documented] == []


def test_it_knows_prefixes_only_of_its_own_namespaces():
    assert event_type_pattern_known("message.*") and event_type_pattern_known("webhook.*")
    assert event_type_pattern_known("ingest.received")
    assert not event_type_pattern_known("ingest.recieved")
    assert not event_type_pattern_known("nothing.*")
    assert not event_type_pattern_known("message.deleted.*")
    assert not event_type_pattern_known("mess.*")  # a prefix is a whole namespace, not the start of a word
