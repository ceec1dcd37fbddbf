"""The package's layering, read from the source: the lower layers never import the flows
or tasks, every exception class lives in ``mathmill/errors.py``, and each setting that
several configuration models share is defined once.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from mathmill.blocks import LLMEndpoint, SandboxEndpoint
from mathmill.flows.options import ModelRole, SandboxOptions
from mathmill.llm.config import EndpointConfig, EndpointFields, Price
from mathmill.sandbox.options import SandboxSettings

PACKAGE = Path(__file__).resolve().parent.parent / "mathmill"

# Below the blocks and the flows: what they build on, never the other way round.
LOWER = ("llm", "sandbox", "grading", "records.py", "storage.py")
ABOVE_BLOCKS = ("mathmill.flows", "mathmill.tasks", "mathmill.pipeline")

# Exception classes still defined in their own modules; errors.py already holds each
# (``_Invalid`` as ``InvalidEngineRequest``). Delete an entry when its module imports
# the class from mathmill.errors (the test says when).
PENDING: set[tuple[str, str]] = set()


def _sources() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=rel)


def _module_name(rel: str) -> str:
    name = rel.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def _imports(rel: str, tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Every module ``tree`` imports, at any depth (functions included), with relative
    imports resolved, plus string constants that name a mathmill module (lazy imports).
    """
    package = _module_name(rel)
    if not rel.endswith("__init__.py"):
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            yield node.lineno, base
            for alias in node.names:  # from mathmill import flows
                yield node.lineno, f"{base}.{alias.name}"
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"mathmill(\.\w+)+", node.value)
        ):
            yield node.lineno, node.value


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _layer_violations(layers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{rel}:{line} imports {name}"
        for rel, tree in _sources()
        if rel.removeprefix("mathmill/").split("/")[0] in layers
        for line, name in _imports(rel, tree)
        if _within(name, forbidden)
    ]


def test_blocks_and_lower_layers_never_import_flows_or_tasks() -> None:
    assert _layer_violations(("blocks", *LOWER), ABOVE_BLOCKS) == []


def test_lower_layers_never_import_blocks() -> None:
    assert _layer_violations(LOWER, ("mathmill.blocks",)) == []


def test_the_import_reader_sees_function_level_and_relative_imports() -> None:
    tree = ast.parse(
        "def f():\n    from mathmill.flows.options import ModelRole\n"
        "from ..tasks import runtime\nimport mathmill.pipeline.dag\nX = 'mathmill.flows.cli'\n"
    )
    found = {name for _, name in _imports("mathmill/blocks/x.py", tree)}
    assert {"mathmill.flows.options", "mathmill.tasks.runtime", "mathmill.pipeline.dag"} <= found
    assert "mathmill.flows.cli" in found


def _exception_classes() -> list[tuple[str, str]]:
    """(file, class) of every class in the package that derives from an exception,
    builtin or mathmill's, at any depth of inheritance.
    """
    classes: list[tuple[str, str, list[str]]] = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rpartition(".")[2] for b in node.bases]
                classes.append((rel, node.name, bases))
    builtin = {
        name
        for name, obj in vars(builtins).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    known = set(builtin)
    while True:  # follow inheritance until nothing new turns up
        more = {name for _, name, bases in classes if known & set(bases)} - known
        if not more:
            break
        known |= more
    return [(rel, name) for rel, name, bases in classes if known & set(bases)]


def test_every_exception_class_is_defined_in_errors_py() -> None:
    found = set(_exception_classes())
    outside = found - PENDING - {(rel, n) for rel, n in found if rel == "mathmill/errors.py"}
    assert outside == set(), "define these in mathmill/errors.py and re-export them"
    done = PENDING - found
    assert done == set(), "now imported from mathmill.errors: delete them from PENDING"


def test_errors_py_holds_the_moved_and_pending_exceptions() -> None:
    found = {name for rel, name in _exception_classes() if rel == "mathmill/errors.py"}
    moved = {"SandboxError", "SandboxUnavailable", "SessionNotFound", "IsolationError"}
    pending = {"IncompleteChunk", "IncompleteRun", "ServerError", "GradingTimeout"}
    assert {"MathmillError", "EndpointTimeout", "InvalidEngineRequest"} | moved | pending <= found


def test_old_import_locations_still_work() -> None:
    from mathmill import errors
    from mathmill.sandbox import SandboxError, SessionNotFound, isolation, protocol

    assert protocol.SandboxUnavailable is errors.SandboxUnavailable
    assert (SandboxError, SessionNotFound) == (errors.SandboxError, errors.SessionNotFound)
    assert isolation.IsolationError is errors.IsolationError


def _same_definition(a: type[BaseModel], b: type[BaseModel], name: str, other: str = "") -> None:
    x, y = a.model_fields[name], b.model_fields[other or name]
    where = f"{a.__name__}.{name} vs {b.__name__}.{other or name}"
    assert x.description and x.description == y.description, where
    assert x.metadata == y.metadata and x.examples == y.examples, where


ENDPOINT_MODELS: list[type[BaseModel]] = [EndpointConfig, LLMEndpoint, ModelRole]


def test_endpoint_models_share_one_definition_of_each_common_field() -> None:
    shared = set(EndpointFields.model_fields) - {"api_key"}  # the key differs in kind
    assert set(ModelRole.model_fields) >= shared - {"extra_body"}
    for i, a in enumerate(ENDPOINT_MODELS):
        for b in ENDPOINT_MODELS[i + 1 :]:
            common = set(a.model_fields) & set(b.model_fields) - {"api_key"}
            assert common, (a, b)
            for name in sorted(common):
                _same_definition(a, b, name)
    # the endpoint's settings are the block's, with the same defaults
    for name in EndpointFields.model_fields:
        assert (
            EndpointConfig.model_fields[name].metadata == EndpointFields.model_fields[name].metadata
        )
    assert [f.default for f in ModelRole.model_fields.values()] == [None] * len(
        ModelRole.model_fields
    )
    _same_definition(Price, LLMEndpoint, "input_per_1m", "input_price_per_1m")
    _same_definition(Price, LLMEndpoint, "output_per_1m", "output_price_per_1m")


@pytest.mark.parametrize("model", ENDPOINT_MODELS)
@pytest.mark.parametrize(
    ("field", "bad"), [("max_concurrency", 0), ("timeout_s", 0), ("max_retries", 21)]
)
def test_endpoint_models_enforce_the_same_bounds(
    model: type[BaseModel], field: str, bad: float
) -> None:
    with pytest.raises(ValidationError, match=field):
        model(base_url="http://h/v1", model="m", **{field: bad})


def test_the_sandbox_block_and_the_flows_sandbox_share_their_settings() -> None:
    settings = SandboxSettings.model_fields
    assert set(SandboxEndpoint.model_fields) == set(settings)
    assert set(SandboxOptions.model_fields) == {*settings, "block"}
    for name in settings:
        _same_definition(SandboxEndpoint, SandboxOptions, name)
        assert (
            SandboxEndpoint.model_fields[name].default == SandboxOptions.model_fields[name].default
        )
