"""The YAML config of ``softmerge merge`` and ``compare``: schema, overrides, path resolution,
one-line errors.

A config names the model (an importable factory), the candidate checkpoints, the data, the
merge plan, the fit settings and the output folder::

    model:      {factory: softmerge.zoo:CNN1D, kwargs: {num_classes: 10}}
    candidates: [ckpt/a.safetensors, {path: ckpt/b.pt, name: b}]
    data:       {dataset: mnist1d}
    plan:       {granularity: tensor}          # fields of MergePlan
    fit:        {steps: 300, l0_lambda: 0.01}  # fields of FitConfig
    output:     {dir: merged-out}

The ``plan`` and ``fit`` sections *are* :class:`MergePlan` and :class:`FitConfig` (one
definition of each setting, see :mod:`softmerge.schema`). ``model`` and ``data`` may be left out
for methods that need neither (a static merge without evaluation). Relative paths resolve
against the config file's folder. Command-line overrides (``--set fit.steps=100``) are applied to
the YAML before it is checked, so they meet the same schema. Every problem, from a YAML syntax
error to a missing checkpoint or an unimportable factory, is found before any work starts and
raised as one :class:`ConfigError` line: ``merge.yaml: fit.l0_lambda: must be >= 0, got -1.0``.
Checking never edits what it checks: :func:`load_config` returns a new, frozen, resolved config
(absolute paths, every candidate named).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from torch import nn

from .candidates import default_name
from .data import LOADERS
from .errors import ConfigError, SoftmergeError
from .fit import FitConfig
from .hf import TASKS
from .methods import MergeMethod, get_method, method_class
from .plan import MergePlan
from .schema import STRICT, describe_validation, got

DATASETS: tuple[str, ...] = (*LOADERS, "tensors", "text", "hf")
_SECTION = STRICT  # every section is strict and frozen, like the settings classes


# ---------------------------------------------------------------------------------------------
# Paths: resolved against the config's folder (passed as validation context), checked to exist.


def _root(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("root") or Path.cwd())


def _resolve(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise PydanticCustomError("path_type", "expected a path, got {got}", {"got": repr(value)})
    return _root(info) / Path(value).expanduser()


def _existing_path(value: Any, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    path = _resolve(value, info)
    if not path.exists():
        raise PydanticCustomError(
            "path_missing", "no such file or folder: {path}", {"path": str(path)}
        )
    return path


def _output_path(value: Any, info: ValidationInfo) -> Path:
    return _resolve(value, info)


ExistingPath = Annotated[Path | None, BeforeValidator(_existing_path)]
OutputPath = Annotated[Path, BeforeValidator(_output_path)]


def _none_as_empty(value: Any) -> Any:
    """``fit:`` with every line commented out is None in YAML; read it as an empty section."""
    return {} if value is None else value


Kwargs = Annotated[dict[str, Any], BeforeValidator(_none_as_empty)]


# ---------------------------------------------------------------------------------------------
# The schema.


def _relative_paths(value: Any, info: ValidationInfo) -> Any:
    """String arguments naming a file or folder relative to the config become absolute paths
    (``model.kwargs: {vocab: tokens.json}``); everything else is left as it is."""
    if not isinstance(value, dict):
        return value
    root = _root(info)
    out = {}
    for key, item in value.items():
        candidate = root / item if isinstance(item, str) and item and "\n" not in item else None
        is_path = candidate is not None and not Path(item).is_absolute() and candidate.exists()
        out[key] = str(candidate) if is_path else item
    return out


class ModelSection(BaseModel):
    """The architecture: an importable factory, or a Hugging Face folder (its config.json)."""

    model_config = _SECTION
    factory: str | None = None
    kwargs: Annotated[
        dict[str, Any], BeforeValidator(_none_as_empty), BeforeValidator(_relative_paths)
    ] = Field(default_factory=dict)
    hf: ExistingPath = None  # a Hugging Face model folder: the class from its architectures
    task: Literal[tuple(TASKS)] | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.factory is None) == (self.hf is None):
            raise ValueError("give exactly one of factory (module:callable) or hf (a folder)")
        if self.task is not None and self.hf is None:
            raise ValueError("task only applies to a Hugging Face model (model.hf)")
        return self


class CandidateEntry(BaseModel):
    model_config = _SECTION
    path: ExistingPath
    name: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, (str, os.PathLike)) else data


PathOrPaths = ExistingPath | list[Annotated[Path, BeforeValidator(_existing_path)]]


class DataSection(BaseModel):
    model_config = _SECTION
    dataset: Literal[DATASETS]  # type: ignore[valid-type]
    path: ExistingPath = None
    merge: PathOrPaths = None  # tensors: one file; text: one file or a list
    eval: PathOrPaths = None
    kwargs: Kwargs = Field(default_factory=dict)
    # text and hf data sets: tokenised with `tokenizer` (default: the model.hf folder's),
    # cut into blocks of `block_size` tokens (language models) or padded to it (classifiers)
    tokenizer: ExistingPath = None
    block_size: Annotated[int, Field(ge=2)] | None = None
    columns: Kwargs = Field(default_factory=dict)  # {text: column, label: column}
    split: Kwargs = Field(default_factory=dict)  # hf: {merge: split name, eval: split name}
    batch_size: Annotated[int, Field(ge=1)] = 128
    seed: Annotated[int, Field(ge=0, lt=2**64)] = 0  # torch.Generator's range
    # Fraction of the merge set kept out of learning: greedy soup scores on it, and learned
    # soup / AdaMerging keep their best iterate on it. 0: greedy soup scores on the merge set.
    held_out: Annotated[float, Field(ge=0, lt=1)] = 0.0


class OutputSection(BaseModel):
    model_config = _SECTION
    dir: OutputPath
    shard_size: str | int = "5GB"  # safetensors shards of at most this size (bytes or '2GB')


class MethodEntry(BaseModel):
    """One row of ``softmerge compare``: a registered method, its parameters, a plan override."""

    model_config = _SECTION
    method: str
    label: str | None = None
    params: Kwargs = Field(default_factory=dict)
    plan: Kwargs = Field(default_factory=dict)
    candidates: Annotated[list[str], Field(min_length=1)] | None = None  # names; None: all

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"method": data} if isinstance(data, str) else data

    @property
    def title(self) -> str:
        return self.label or self.method


class MergeConfig(BaseModel):
    """A validated merge config; paths are absolute, every candidate has a name."""

    model_config = _SECTION
    model: ModelSection | None = None
    candidates: Annotated[list[CandidateEntry], Field(min_length=2)]
    data: DataSection | None = None
    # The YAML key is ``plan``; the attribute has another name so ``plan()`` can be a method.
    plan_section: MergePlan = Field(default_factory=MergePlan, alias="plan")
    fit: FitConfig = Field(default_factory=FitConfig)
    output: OutputSection
    # `softmerge merge` runs `method` (any registered name) with `params`; for "soft" the
    # params override the fit section. `softmerge compare` runs every entry of `methods`.
    method: str = "soft"
    params: Kwargs = Field(default_factory=dict)
    methods: list[MethodEntry] | None = None

    _source: Path = PrivateAttr(default_factory=Path)
    _root: Path = PrivateAttr(default_factory=Path.cwd)
    _factory: Callable[..., Any] | None = PrivateAttr(default=None)

    @field_validator("plan_section", "fit", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return _none_as_empty(value)

    @model_validator(mode="before")
    @classmethod
    def _resolve_names(cls, data: Any, info: ValidationInfo) -> Any:
        """Name every candidate (its file stem; repeated stems numbered a-1, a-2) and make a
        base path absolute, on a copy of the input: the result is what gets validated."""
        if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
            return data
        data = copy.copy(data)
        data["candidates"] = _named_entries(data["candidates"], _root(info))
        plan = data.get("plan")
        if isinstance(plan, dict) and isinstance(plan.get("base"), str):
            names = [e.get("name") for e in data["candidates"] if isinstance(e, dict)]
            base = plan["base"]
            path = _root(info) / Path(base).expanduser()
            if base not in names and path.exists():
                data["plan"] = {**plan, "base": str(path)}
        return data

    @property
    def source(self) -> Path:
        """The config file this was read from."""
        return self._source

    def plan(self) -> MergePlan:
        return self.plan_section

    def fit_config(self) -> FitConfig:
        return self.fit

    def build_method(self, name: str, params: Mapping[str, Any]) -> MergeMethod:
        """The registered method ``name``; soft merging starts from the ``fit`` section."""
        if name == "soft":
            # The fit section is the starting point; seed and progress come from the run
            # (--seed, --no-progress) unless the entry sets them itself.
            fit = self.fit.model_dump(exclude={"seed", "progress"})
            params = {**fit, **params}
        return get_method(name, **params)

    def plan_for(self, entry: MethodEntry) -> MergePlan:
        return MergePlan(**{**self.plan_section.model_dump(), **entry.plan})

    def candidate_paths(self) -> list[Path]:
        return [c.path for c in self.candidates]  # type: ignore[misc]

    def candidate_names(self) -> list[str]:
        return [str(c.name) for c in self.candidates]

    def input_paths(self) -> list[tuple[str, Path]]:
        """(config key, path) of every file or folder the merge reads."""
        found = [(f"candidates[{i}]", c.path) for i, c in enumerate(self.candidates)]
        if self.model is not None and self.model.hf is not None:
            found.append(("model.hf", self.model.hf))
        if self.data is not None:
            for key in ("path", "merge", "eval", "tokenizer"):
                paths = _as_list(getattr(self.data, key))
                found += [(f"data.{key}", p) for p in paths]
        base = self.plan_section.base
        if base is not None and base not in self.candidate_names():
            found.append(("plan.base", Path(base)))
        return [(key, path) for key, path in found if path is not None]

    def build_model(self) -> nn.Module:
        """Call the factory with ``model.kwargs``; a failure names the factory and the error."""
        if self.model is None:
            raise ConfigError(f"{self._source}: model: this run needs a model section")
        if self.model.hf is not None:
            from .hf import build_hf_model

            try:
                return build_hf_model(self.model.hf, self.model.task)
            except ConfigError as exc:
                raise ConfigError(f"{self._source}: model.hf: {exc}") from None
        assert self.model.factory is not None
        factory = self._factory or _import_factory(
            self.model.factory, self._root, _Reporter(self._source)
        )
        where = f"{self._source}: model.factory"
        try:
            model = factory(**self.model.kwargs)
        except SoftmergeError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"{where}: {self.model.factory}(**{self.model.kwargs}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"{where}: {self.model.factory} returned a {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        return model


def _named_entries(entries: list[Any], root: Path) -> list[Any]:
    """Candidate entries with a name each: given names kept, unnamed ones get their stem."""
    out = [{"path": e} if isinstance(e, (str, os.PathLike)) else copy.copy(e) for e in entries]
    taken: dict[str, int] = {}
    for i, e in enumerate(out):
        name = e.get("name") if isinstance(e, dict) else None
        if isinstance(name, str) and name:
            taken.setdefault(name, i)
    unnamed = {
        i: default_name(root / Path(os.fspath(e["path"])).expanduser(), i)
        for i, e in enumerate(out)
        if isinstance(e, dict)
        and e.get("name") is None
        and isinstance(e.get("path"), (str, os.PathLike))
    }
    stems = list(unnamed.values())
    for i, stem in unnamed.items():
        name, k = stem, 0
        if stems.count(stem) > 1 or stem in taken:
            while name in taken or k == 0:
                k += 1
                name = f"{stem}-{k}"
        out[i]["name"] = name
        taken[name] = i
    return out


# ---------------------------------------------------------------------------------------------
# Reading YAML, applying overrides.


class _YamlLoader(yaml.SafeLoader):
    """``yaml.safe_load`` plus two fixes for hand-written configs: ``1e-3`` is a float (PyYAML
    follows YAML 1.1, where it is a string), and a key given twice is an error, not silently
    the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_YamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _YamlLoader.construct_mapping
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a YAML config file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        # A SafeLoader subclass: as safe as yaml.safe_load (no arbitrary objects).
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}invalid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    """``fit.steps=100`` -> (["fit", "steps"], 100); the value is read as YAML."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. fit.steps=100")
    try:
        parsed = yaml.load(value, Loader=_YamlLoader) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: invalid value: {exc}") from exc
    return parts, parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``KEY=VALUE`` of ``overrides`` set (sections are created;
    a key written ``?KEY`` is only set where its section exists)."""
    out = copy.deepcopy(data)
    for text in overrides:
        optional = text.startswith("?")
        parts, value = parse_override(text.removeprefix("?"))
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None and optional:
                break
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        else:
            node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> MergeConfig:
    """Read and check a merge config (``overrides`` applied first); raise ConfigError naming
    the file and the key."""
    source = Path(path)
    data = _read_yaml(source)
    if overrides:
        if not isinstance(data, dict):
            data = {} if data is None else data
        if isinstance(data, dict):
            data = apply_overrides(data, overrides)
    return parse_config(data, source=source, root=source.absolute().parent)


def parse_config(data: Any, *, source: str | os.PathLike[str], root: Path) -> MergeConfig:
    """Validate already-parsed config data; relative paths resolve against ``root``."""
    src = Path(source)
    if not data:
        raise ConfigError(f"{src}: the config is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{src}: the top level must be a mapping of sections "
            f"({', '.join(_allowed_keys(MergeConfig))}), got {_kind(data)}"
        )
    try:
        cfg = MergeConfig.model_validate(data, context={"root": root.absolute()})
    except ValidationError as exc:
        raise ConfigError(f"{src}: {_describe_errors(exc)}") from None
    cfg._source, cfg._root = src, root.absolute()
    _check(cfg, _Reporter(src))
    return cfg


# ---------------------------------------------------------------------------------------------
# Pydantic errors as one line: key path, what was expected, what was given.


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _allowed_keys(cls: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in cls.model_fields.items()]


def _section_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The schema class of the mapping at ``loc`` (list indices step into the item type)."""
    cls: type[BaseModel] = MergeConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((f for n, f in cls.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return None
        nested = [t for t in _flatten_type(field.annotation) if _is_model(t)]
        if not nested:
            return None
        cls = nested[0]
    return cls


def _flatten_type(tp: Any) -> Iterator[Any]:
    yield tp
    for arg in get_args(tp):
        yield from _flatten_type(arg)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _describe_errors(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    section = _section_at(first["loc"][:-1]) if first["type"] == "extra_forbidden" else None
    allowed = _allowed_keys(section) if section else ()
    return describe_validation(exc, style="config", allowed=allowed)


# ---------------------------------------------------------------------------------------------
# Checks across keys, and the ones that need the file system or an import.


@dataclasses.dataclass
class _Reporter:
    source: Path

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")


def _check(cfg: MergeConfig, report: _Reporter) -> None:
    if cfg.model is not None and cfg.model.factory is not None:
        cfg._factory = _import_factory(cfg.model.factory, cfg._root, report)
        _check_kwargs(cfg._factory, cfg.model.kwargs, "model.kwargs", cfg.model.factory, report)
    if cfg.model is not None and cfg.model.hf is not None:
        from .hf import read_config

        try:
            read_config(cfg.model.hf)
        except ConfigError as exc:
            raise report.fail("model.hf", str(exc)) from None
    if cfg.data is not None:
        if cfg.model is None:
            raise report.fail("model", "required when a data section is given (to evaluate)")
        _check_data(cfg, report)
    _check_objective(cfg, report)
    _check_unique_names(cfg, report)
    _check_base(cfg, report)
    _check_rest_from(cfg, report)
    _check_methods(cfg, report)
    from .export import parse_size

    try:
        parse_size(cfg.output.shard_size)
    except SoftmergeError as exc:
        raise report.fail("output.shard_size", str(exc).removeprefix("shard_size ")) from None


def _check_methods(cfg: MergeConfig, report: _Reporter) -> None:
    """``method``/``params`` and every ``methods`` entry name a method with valid parameters."""
    checks = [("method", MethodEntry(method=cfg.method, params=cfg.params))]
    checks += [(f"methods[{i}]", entry) for i, entry in enumerate(cfg.methods or [])]
    plan_keys = list(MergePlan.model_fields)
    for key, entry in checks:
        try:
            cls = method_class(entry.method)
        except SoftmergeError as exc:
            raise report.fail(key, str(exc)) from None
        params_key = "params" if key == "method" else f"{key}.params"
        try:
            method = cfg.build_method(entry.method, entry.params)
        except SoftmergeError as exc:
            raise report.fail(params_key, str(exc)) from None
        for name in entry.plan:
            if name not in plan_keys:
                raise report.fail(f"{key}.plan", f"unknown key '{name}'{_suggest(name, plan_keys)}")
        try:
            cfg.plan_for(entry)
        except (SoftmergeError, TypeError) as exc:
            raise report.fail(f"{key}.plan", str(exc)) from None
        if cls.needs_data and cfg.data is None and key == "method":
            raise report.fail("data", f"method {entry.method!r} learns on data: add a data section")
        names = cfg.candidate_names()
        for name in entry.candidates or []:
            if name not in names:
                raise report.fail(
                    f"{key}.candidates",
                    f"{name!r} is not a candidate name ({', '.join(names)})"
                    + _suggest(name, names),
                )
        _check_early_stopping(cfg, method, entry.params, params_key, report)


_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@contextmanager
def _importable_from(folder: Path) -> Iterator[None]:
    """Let ``factory: mymodels:Net`` find a ``mymodels.py`` that sits beside the config."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if str(folder) in sys.path:
            sys.path.remove(str(folder))


def _import_factory(spec: str, root: Path, report: _Reporter | None = None) -> Callable[..., Any]:
    report = report or _Reporter(Path("config"))
    if not _FACTORY.match(spec):
        raise report.fail(
            "model.factory",
            f"expected 'module:callable' (e.g. softmerge.zoo:CNN1D), got {spec!r}",
        )
    module_name, attr_path = spec.split(":")
    try:
        with _importable_from(root):
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):  # the module itself
            raise report.fail(
                "model.factory", f"cannot import module '{module_name}': {exc}"
            ) from None
        raise report.fail(
            "model.factory", f"importing module '{module_name}' failed: {exc}"
        ) from None
    except Exception as exc:  # the user's module may raise anything while it is imported
        raise report.fail(
            "model.factory",
            f"importing module '{module_name}' failed: {type(exc).__name__}: {exc}",
        ) from None
    obj: Any = module
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr_path.split(".")[:i]])
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise report.fail(
                "model.factory", f"'{owner}' has no attribute '{part}'{_suggest(part, names)}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise report.fail(
            "model.factory", f"'{spec}' is not callable (it is a {type(obj).__name__})"
        )
    return obj


def _check_early_stopping(
    cfg: MergeConfig,
    method: MergeMethod,
    params: Mapping[str, Any],
    params_key: str,
    report: _Reporter,
) -> None:
    """A soft merge with ``select_every`` needs held-out data (``data.held_out``)."""
    if method.name != "soft" or not method.params.select_every:
        return
    if cfg.data is not None and cfg.data.held_out > 0:
        return
    raise report.fail(
        f"{params_key}.select_every" if "select_every" in params else "fit.select_every",
        "keeps the gates of the step with the lowest held-out loss, but no merge data is "
        "held out: set data.held_out (a fraction, e.g. 0.2) or select_every to 0",
    )


def _check_kwargs(
    func: Callable[..., Any], kwargs: Mapping[str, Any], key: str, label: str, report: _Reporter
) -> None:
    """Catch a misspelt or missing argument now, not after the data has been loaded."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return
    params = sig.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for name in kwargs:
            if name not in params:
                raise report.fail(
                    f"{key}.{name}", f"not an argument of {label}{_suggest(name, list(params))}"
                )
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        raise report.fail(key, f"{label}: {exc}") from None


def _check_objective(cfg: MergeConfig, report: _Reporter) -> None:
    """``fit.objective: package.module:function`` must import and be callable."""
    spec = cfg.fit.objective
    if isinstance(spec, str) and ":" in spec:
        from .objectives import import_callable

        with _importable_from(cfg._root):
            try:
                import_callable(spec)
            except SoftmergeError as exc:
                raise report.fail("fit.objective", str(exc)) from None


def _as_list(value: Any) -> list[Path]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _check_text_data(cfg: MergeConfig, report: _Reporter) -> None:
    data = cfg.data
    assert data is not None
    unknown = [k for k in data.columns if k not in ("text", "label")]
    if unknown:
        raise report.fail(f"data.columns.{unknown[0]}", "unknown role; use text and label")
    if data.dataset == "text":
        if not data.merge:
            raise report.fail("data.merge", "required with dataset 'text' (text files)")
        for key in ("path", "split"):
            if getattr(data, key):
                raise report.fail(f"data.{key}", "not used with dataset 'text'")
    else:
        if data.path is None or not data.path.is_dir():
            raise report.fail("data.path", "dataset 'hf' needs a datasets.save_to_disk folder")
        for key in ("merge", "eval"):
            if getattr(data, key) is not None:
                raise report.fail(f"data.{key}", "not used with dataset 'hf' (use data.split)")
        unknown = [k for k in data.split if k not in ("merge", "eval")]
        if unknown:
            raise report.fail(f"data.split.{unknown[0]}", "unknown role; use merge and eval")
    if data.tokenizer is None and (cfg.model is None or cfg.model.hf is None):
        raise report.fail(
            "data.tokenizer", f"required with dataset {data.dataset!r} unless model.hf is given"
        )
    for key in ("merge", "eval"):
        for path in _as_list(getattr(data, key)):
            if path.is_dir():
                raise report.fail(f"data.{key}", f"{path} is a folder, expected text files")


def _check_data(cfg: MergeConfig, report: _Reporter) -> None:
    data = cfg.data
    assert data is not None
    ds = data.dataset
    if ds in ("text", "hf"):
        _check_text_data(cfg, report)
        return
    for key in ("tokenizer", "block_size", "columns", "split"):
        if getattr(data, key):
            raise report.fail(f"data.{key}", f"only used with dataset 'text' or 'hf', not {ds!r}")
    if ds == "tensors":
        if data.merge is None:
            raise report.fail(
                "data.merge", "required with dataset 'tensors' (a file holding tensors x and y)"
            )
        for key in ("path", "kwargs"):
            if getattr(data, key):
                raise report.fail(f"data.{key}", "not used with dataset 'tensors'")
        for key in ("merge", "eval"):
            path = getattr(data, key)
            if isinstance(path, list):
                raise report.fail(f"data.{key}", "dataset 'tensors' takes one file")
            if path is not None and path.is_dir():
                raise report.fail(f"data.{key}", f"{path} is a folder, expected a tensors file")
        return
    for key in ("merge", "eval"):
        if getattr(data, key) is not None:
            raise report.fail(f"data.{key}", f"only used with dataset 'tensors', not {ds!r}")
    if "path" in data.kwargs:
        raise report.fail("data.kwargs.path", "set data.path instead")
    loader = LOADERS[ds]
    path_param = inspect.signature(loader).parameters.get("path")
    # A loader whose path has a default finds its files itself (MNIST: SOFTMERGE_DATA, cache).
    path_required = path_param is not None and path_param.default is inspect.Parameter.empty
    if path_required and data.path is None:
        raise report.fail("data.path", f"dataset {ds!r} needs the folder holding its files")
    if path_param is None and data.path is not None:
        raise report.fail("data.path", f"not used with dataset {ds!r}")
    if data.path is not None and not data.path.is_dir():
        raise report.fail("data.path", f"{data.path} is not a folder")
    given = {**data.kwargs, **({"path": data.path} if data.path is not None else {})}
    _check_kwargs(loader, given, "data.kwargs", loader.__name__, report)


def _check_unique_names(cfg: MergeConfig, report: _Reporter) -> None:
    taken: dict[str, int] = {}
    for i, entry in enumerate(cfg.candidates):
        name = str(entry.name)
        if name in taken:
            raise report.fail(
                f"candidates[{i}].name",
                f"{name!r} is already the name of candidates[{taken[name]}]",
            )
        taken[name] = i


def _check_base(cfg: MergeConfig, report: _Reporter) -> None:
    """plan.base names a candidate, or is a checkpoint path (made absolute when read)."""
    base = cfg.plan_section.base
    if (
        base is None
        or base in cfg.candidate_names()
        or (Path(base).is_absolute() and Path(base).exists())
    ):
        return
    path = cfg._root / Path(base).expanduser()
    raise report.fail(
        "plan.base",
        f"{base!r} is neither a candidate name ({', '.join(cfg.candidate_names())}) "
        f"nor an existing file ({path}){_suggest(base, cfg.candidate_names())}",
    )


def _check_rest_from(cfg: MergeConfig, report: _Reporter) -> None:
    choice = cfg.plan_section.rest_from
    allowed = ["best", "average", *cfg.candidate_names()]
    if cfg.plan_section.combine == "delta":
        allowed.append("base")
    if choice not in allowed:
        raise report.fail(
            "plan.rest_from",
            f"expected 'best', 'average' or a candidate name ({', '.join(allowed[2:])}), "
            f"got {choice!r}{_suggest(choice, allowed)}",
        )


__all__ = ["MergeConfig", "apply_overrides", "got", "load_config", "parse_config"]
