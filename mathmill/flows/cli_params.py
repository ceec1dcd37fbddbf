"""Command-line options built from a pipeline's pydantic params model.

:func:`params_command` registers ``mathmill run NAME`` from the model alone: a flag per
top-level scalar field (``--field-name``, its description as the help, its default
shown), shortcut flags for common nested fields (``--base-url`` ->
``models.default.base_url``), ``--set a.b=c`` for any field at any depth and
``--config FILE``. Precedence: config file < ``--set`` < flags. A bad value is one
:class:`ConfigError` line naming the dotted field.

The model is loaded when the command's options are first needed (parsing its
arguments, its ``--help``), so ``mathmill --help`` never imports a flow module.
"""

from __future__ import annotations

import enum
import inspect
import json
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args
from typing import get_origin as _origin

import typer
import typer.main
from rich.markup import escape
from typer.core import TyperCommand

from mathmill.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError
    from pydantic.fields import FieldInfo

__all__ = [
    "ParamsCommand",
    "Shortcut",
    "build_params",
    "field_type",
    "load_config_file",
    "option",
    "params_command",
    "params_of",
    "parse_set",
    "set_path",
    "validation_message",
]

M = TypeVar("M", bound="BaseModel")
Kind = Literal["bool", "int", "float", "str", "choice", "list"]
PARAMS_PANEL = "Parameters"
SHORTCUTS_PANEL = "Shortcuts (any other nested field: --set PATH=VALUE)"
_METAVAR = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "list": "A,B,..."}
_GIVEN = ("COMMANDLINE", "ENVIRONMENT")  # where a value was given (click's ParameterSource)


# -- from a config file and dotted values to a validated model ------------------------------


def validation_message(error: ValidationError, what: str) -> str:
    """One line naming each bad field: ``topics: Input should be ...``."""
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(config)"
        parts.append(f"{where}: {e['msg']}")
    return f"invalid {what}: " + "; ".join(parts)


def load_config_file(path: Path | None) -> dict[str, Any]:
    """A JSON or YAML file of flow parameters (empty when no file)."""
    if path is None:
        return {}
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json and yaml raise different errors
        reason = " ".join(str(e).split())  # YAML's messages span lines
        raise ConfigError(f"config file {path} does not parse: {reason}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of parameters")
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``a.b.c``, making the mappings on the way."""
    *parents, leaf = dotted.split(".")
    node = data
    for depth, p in enumerate(parents):
        child = node.get(p)
        if not isinstance(child, dict):
            if child is not None:
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"{dotted}: {where} is {child!r}, not a mapping")
            child = node[p] = {}
        node = child
    node[leaf] = value


def build_params(
    model: type[M],
    config: Path | None,
    values: Mapping[str, Any] | Iterable[tuple[str, Any]],
    what: str,
) -> M:
    """Flow parameters from a config file, then each ``(dotted path, value)`` of
    ``values`` set over it in order (None included); a bad value is one
    :class:`ConfigError` line naming the field.
    """
    from pydantic import ValidationError

    data = load_config_file(config)
    pairs = values.items() if isinstance(values, Mapping) else values
    for key, value in pairs:
        set_path(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_message(e, what)) from None


# -- the fields of a model ------------------------------------------------------------------


@dataclass(frozen=True)
class FieldType:
    """What a flag can hold: a scalar kind, its choices (``Literal``), optional or not."""

    kind: Kind
    choices: tuple[str, ...] = ()
    optional: bool = False


def field_type(annotation: Any) -> FieldType | None:
    """The command-line kind of a field's type (``int | None`` -> int, optional); None
    for nested models, mappings and whatever else a flag cannot hold.
    """
    origin = _origin(annotation)
    if origin is Annotated:
        return field_type(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        inner = field_type(args[0]) if len(args) == 1 else None
        return replace(inner, optional=True) if inner else None
    if origin is Literal:
        values = get_args(annotation)
        ok = all(isinstance(v, str) for v in values)
        return FieldType("choice", tuple(values)) if ok else None
    if origin is list:
        item = field_type((get_args(annotation) or (str,))[0])
        return FieldType("list") if item and item.kind in ("str", "int", "float") else None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return FieldType("choice", tuple(str(e.value) for e in annotation))
    scalars: dict[Any, Kind] = {bool: "bool", int: "int", float: "float", str: "str"}
    kind = scalars.get(annotation)
    return FieldType(kind) if kind else None


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model class a field holds (``Model``, ``Model | None``), else None."""
    from pydantic import BaseModel

    origin = _origin(annotation)
    if origin is Annotated:
        return _submodel(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        models = [m for a in get_args(annotation) if (m := _submodel(a)) is not None]
        return models[0] if len(models) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def field_at(model: type[BaseModel], dotted: str) -> FieldInfo | None:
    """The field at a dotted path (``models.coder.temperature``); None past a field that
    is not a model (a mapping: pydantic checks the rest). Raises :class:`ConfigError`
    naming the path when a model on the way has no such field.
    """
    names = dotted.split(".")
    current: type[BaseModel] | None = model
    info: FieldInfo | None = None
    for depth, name in enumerate(names):
        if current is None:
            return None
        info = current.model_fields.get(name)
        if info is None:
            where = ".".join(names[:depth]) or "the top level"
            known = ", ".join(current.model_fields)
            raise ConfigError(f"{dotted}: no such parameter ({where} has: {known})")
        current = _submodel(info.annotation)
    return info


def _default(info: FieldInfo) -> str | None:
    """A field's default as help shows it (None when there is none to show)."""
    from pydantic import BaseModel

    if info.is_required():
        return "required"
    try:
        value = info.get_default(call_default_factory=True)
    except TypeError:  # a factory that needs the other fields
        return None
    if value is None or isinstance(value, BaseModel):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


# -- flags ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shortcut:
    """A flag for a nested field: ``"--base-url": Shortcut("models.default.base_url")``
    (a plain string means the same); ``also`` is set with it when it is given, and
    ``help`` replaces the field's description.
    """

    path: str
    also: Mapping[str, Any] = field(default_factory=dict)
    help: str | None = None


@dataclass(frozen=True)
class Target:
    """Where a flag's value goes: its dotted path, kind, and what is set with it."""

    path: str
    kind: Kind
    also: Mapping[str, Any] = field(default_factory=dict)

    def pairs(self, raw: Any) -> list[tuple[str, Any]]:
        """``(path, value)`` for a given flag (a list split on commas), then ``also``."""
        value = raw
        if self.kind == "list" and isinstance(raw, str):
            value = [part.strip() for part in raw.split(",") if part.strip()]
        return [(self.path, value), *self.also.items()]


def option(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    """A command option as typer declares one: ``option("debug", Annotated[bool,
    typer.Option("--debug", help=...)], False)`` (for ``extra`` of :func:`params_command`).
    """
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _help(info: FieldInfo, extra: str = "", text: str | None = None) -> str:
    """An option's help (escaped: typer reads rich markup): the description, ``extra``."""
    return escape(f"{text or info.description or ''} {extra}".strip())


def _field_option(
    flag: str, info: FieldInfo, kind: FieldType, help: str, panel: str, top: bool = True
) -> inspect.Parameter:
    """A field's option: a switch (``--dry-run``: a boolean that defaults to false) or
    ``--x/--no-x`` for booleans; else text that pydantic converts and checks, so every
    bad value takes one error path. Help shows the model's default (a value given
    nowhere is left out of the parameters: the model's default applies).
    """
    name = flag.removeprefix("--").replace("-", "_")
    default = _default(info)
    if default == "required":
        default = None
        help = f"{help} Required: here, in --config or with --set." if top else help
    if kind.kind == "bool":
        switch = info.default is False
        decl = flag if switch else f"{flag}/--no-{flag.removeprefix('--')}"
        shown = not switch and isinstance(info.default, bool)
        typed = typer.Option(decl, help=help, show_default=shown, rich_help_panel=panel)
        return option(name, Annotated[bool | None, typed], info.default if shown else None)
    choices = "[" + "|".join(kind.choices) + "]"
    metavar = choices if kind.kind == "choice" else _METAVAR[kind.kind]
    shown = default is not None
    typed = typer.Option(
        flag, help=help, metavar=metavar, show_default=shown, rich_help_panel=panel
    )
    return option(name, Annotated[str | None, typed], default)


def model_options(
    model: type[BaseModel],
    shortcuts: Mapping[str, str | Shortcut],
    taken: Iterable[str] = (),
) -> list[tuple[inspect.Parameter, Target]]:
    """An option per top-level scalar field whose flag and path no shortcut and no
    ``taken`` flag already holds, then the shortcut options (those fields stay reachable with
    ``--set``, or a shortcut gives them another flag).
    """
    nested = [_shortcut(model, flag, s) for flag, s in shortcuts.items()]
    used = {*taken, *shortcuts}
    targeted = {target.path for _, target in nested}
    out = []
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = field_type(info.annotation)
        if kind is None or flag in used or name in targeted:
            continue
        param = _field_option(flag, info, kind, _help(info), PARAMS_PANEL)
        out.append((param, Target(name, kind.kind)))
    return [*out, *nested]


def _shortcut(
    model: type[BaseModel], flag: str, shortcut: str | Shortcut
) -> tuple[inspect.Parameter, Target]:
    s = Shortcut(shortcut) if isinstance(shortcut, str) else shortcut
    info = field_at(model, s.path)
    kind = field_type(info.annotation) if info else None
    if info is None or kind is None:
        raise ValueError(f"shortcut {flag}: {s.path} is not a scalar field of {model.__name__}")
    also = "".join(f"; also {k}={v}" for k, v in s.also.items())
    help = _help(info, f"({s.path}{also})", s.help)
    return _field_option(flag, info, kind, help, SHORTCUTS_PANEL, top=False), Target(
        s.path, kind.kind, s.also
    )


def parse_set(model: type[BaseModel], items: Iterable[str]) -> list[tuple[str, Any]]:
    """``--set PATH=VALUE`` items as ``(path, value)``: each path checked against the
    model (:class:`ConfigError` naming an unknown one); the value is JSON when it
    parses (numbers, booleans, null, lists, objects), else the text. A text field
    keeps the text as it is (``--set out=2024``), a list field splits it on commas.
    """
    pairs = []
    for item in items:
        path, sep, raw = item.partition("=")
        path = path.strip()
        if not sep or not path:
            raise ConfigError(f"--set {item!r}: expected PATH=VALUE (models.coder.temperature=0.3)")
        try:
            info = field_at(model, path)
        except ConfigError as e:
            raise ConfigError(f"--set {e}") from None
        pairs.append((path, _set_value(raw, field_type(info.annotation) if info else None)))
    return pairs


def _set_value(raw: str, kind: FieldType | None) -> Any:
    if kind is not None and kind.kind in ("str", "choice"):
        return None if raw == "null" and kind.optional else raw
    try:
        return json.loads(raw)
    except ValueError:
        pass
    if kind is not None and kind.kind == "list":
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


# -- the command ----------------------------------------------------------------------------


@dataclass
class CommandSpec:
    """What :func:`params_command` registered: how to load the model, what runs it."""

    name: str
    load: Callable[[], type[BaseModel]]
    run: Callable[[Any, Mapping[str, Any]], None]
    shortcuts: Mapping[str, str | Shortcut]
    extra: Sequence[inspect.Parameter]
    what: str


CONFIG = option(
    "config",
    Annotated[
        Path | None,
        typer.Option(
            "--config", metavar="FILE", help="JSON/YAML file of parameters (--set and flags win)."
        ),
    ],
)
SET = option(
    "set",
    Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="PATH=VALUE",
            help="Any parameter at any depth, e.g. models.coder.temperature=0.3 (repeatable; "
            "flags win). VALUE is JSON when it parses (numbers, true/false, null, lists), "
            "else text.",
        ),
    ],
)


def typer_params(parameters: Sequence[inspect.Parameter]) -> list[Any]:
    """The click parameters typer makes of these (as for a function's signature)."""

    def command(**_: Any) -> None:  # pragma: no cover  (never called)
        raise NotImplementedError

    command.__signature__ = inspect.Signature(list(parameters))  # type: ignore[attr-defined]
    app = typer.Typer(add_completion=False)
    app.command()(command)
    return list(typer.main.get_command(app).params)


class ParamsCommand(TyperCommand):
    """A ``mathmill run`` command whose options come from its params model, built the
    first time they are needed (so listing the commands imports no flow module).
    """

    spec: ClassVar[CommandSpec]
    _own: list[Any]
    _built: list[Any] | None
    _targets: dict[str, Target]

    @property
    def params(self) -> list[Any]:
        """The model's options, then ``--config``, ``--set``, the extra options, typer's."""
        if self._built is None:
            run = [*typer_params([CONFIG, SET, *self.spec.extra]), *self._own]
            taken = {"--help", *(o for p in run for o in (*p.opts, *p.secondary_opts))}
            options = model_options(self.model, self.spec.shortcuts, taken)
            self._targets = {p.name: t for p, t in options}
            self._built = [*typer_params([p for p, _ in options]), *run]
        return self._built

    @params.setter
    def params(self, value: list[Any]) -> None:
        self._own, self._built = list(value), None

    def flag_paths(self) -> dict[str, str]:
        """Each model option's flag and the dotted path it sets (``--model`` ->
        ``models.default.model``).
        """
        flags = {p.name: p.opts[0] for p in self.params}
        return {flags[name]: target.path for name, target in self._targets.items()}

    @property
    def model(self) -> type[BaseModel]:
        """The params model (imported on first use)."""
        return self.spec.load()

    def validated(self, ctx: Any) -> BaseModel:
        """The model from ``--config``, then ``--set``, then the flags given."""
        self.params  # noqa: B018  (builds the targets)
        try:
            pairs = parse_set(self.model, ctx.params.get("set") or ())
        except ConfigError as e:
            raise ConfigError(f"invalid {self.spec.what}: {e}") from None
        for name, target in self._targets.items():
            if ctx.get_parameter_source(name).name in _GIVEN:
                pairs += target.pairs(ctx.params[name])
        config = ctx.params.get("config")
        return build_params(self.model, Path(config) if config else None, pairs, self.spec.what)

    def invoke(self, ctx: Any) -> None:
        """Validate the parameters, then run the pipeline with them and the extras."""
        params = self.validated(ctx)
        self.spec.run(params, {p.name: ctx.params.get(p.name) for p in self.spec.extra})


def params_command(
    app: typer.Typer,
    name: str,
    model: type[M] | Callable[[], type[M]],
    run: Callable[[M, Mapping[str, Any]], None],
    *,
    shortcuts: Mapping[str, str | Shortcut] | None = None,
    extra: Sequence[inspect.Parameter] = (),
    help: str | None = None,
    what: str | None = None,
) -> None:
    """Register ``NAME`` on ``app``: options from ``model`` (the class, or a function
    returning it, called when the options are first needed: ``mathmill --help`` imports
    no flow), ``shortcuts`` (flag -> dotted path or :class:`Shortcut`) and ``extra``
    options (see :func:`option`); ``run(params, extra_values)`` gets the validated model
    and the extra options' values by name. ``help`` defaults to ``run``'s docstring.
    """
    load: Callable[[], type[BaseModel]] = (lambda: model) if isinstance(model, type) else model
    spec = CommandSpec(name, load, run, shortcuts or {}, extra, what or f"{name} parameters")
    cls = type(f"{name.title().replace('-', '')}Command", (ParamsCommand,), {"spec": spec})

    def command() -> None:  # pragma: no cover  (ParamsCommand.invoke runs instead)
        raise NotImplementedError

    app.command(name, cls=cls, help=help or inspect.getdoc(run))(command)


def params_of(command: Any, args: Sequence[str]) -> BaseModel:
    """The validated parameters a params command would run with for ``args`` (runs
    nothing); ``command`` as ``typer.main.get_command(app)`` gives it.
    """
    if not isinstance(command, ParamsCommand):
        raise TypeError(f"{command.name} is not a params command")
    with command.make_context(command.name, list(args)) as ctx:
        return command.validated(ctx)
