"""Recipes: dataclasses with YAML in/out; overrides are checked against the fields."""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from quantkit.errors import QuantkitError

RECIPE_DIRS = (Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes")


@dataclass
class CalibConfig:
    dataset: str = "mix"            # all six bundled domains, an equal share of windows each
    n_samples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    table_samples: int = 32         # windows (the first ones) the mixed-precision cost table uses


@dataclass
class EvalConfig:
    dataset: str = "mix"            # the suite: every bundled domain (evals/suite.py)
    seqlen: int = 1024
    max_windows: int | None = None


@dataclass
class Recipe:
    """Everything a run depends on; saved next to its output."""
    model: str = "smollm2-135m"
    method: str = "gptq"
    bits: float = 4                 # uniform: the bit width; otherwise the average budget
    act_bits: int | None = None     # image models: each layer's input at this width (None: fp)
    max_bops: float | None = None   # image models, --alloc ip: compute budget in GBOPs (Σ MACs x weight bits x input bits)
    bn_reestimate: bool = False     # image models: re-fit each BN-folded layer's channel mean/std to the fp model's after quantization
    bias_correction: bool = False   # image models: subtract each layer's mean output shift from its weight error (E[δW·x]) from its bias
    bit_options: list[int | str] = field(default_factory=lambda: [2, 3, 4, 8])  # or "BITS:GROUP"
    sensitivity: str = "hessian"    # hessian | fisher | trace | kl: how the cost table prices errors
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    static_groups: bool = True
    mse: bool = False               # min-max grid (the MSE shrink search loses out of domain)
    damp: float = 0.01
    true_sequential: bool = True
    fp_target: bool = True          # aim at the unquantized model's outputs (compensates drift)
    alloc: str = "uniform"          # uniform | ip | baq | pareto
    tie_fused: bool = False         # mixed: q/k/v and gate/up share a width (what vLLM/GPTQ exports need)
    prune: str | None = None        # magnitude | wanda | sparsegpt | armor: N:M-prune every block linear
    pattern: str = "2:4"            # prune: keep N of every M weights along the input dimension
    seed: int = 0
    device: str = "cpu"
    stream: bool | None = None      # weights read block by block from the shards (None: when the model would not fit in max_memory)
    max_memory: str | None = None   # memory budget, e.g. "8GB" (default: the RAM available at start)
    offload_activations: str | None = None   # keep calibration activations in files here (default: on disk beside out when over budget)
    out: str | None = None
    report: str | None = None       # directory for the allocation report (JSON + PNG plots)
    # what changes when the recipe is mixed (alloc not uniform: --alloc ip|baq|pareto): fields and
    # sections, e.g. method, bit_options, rsq:; a value given with the --alloc override wins.
    # Applied once: the resulting recipe records the values that ran, and an empty `mixed:`.
    mixed: dict = field(default_factory=dict)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the methods' own sections (rsq:, armor:, llm_int8: ...), each validated against the options
    # dataclass its method registers with (quantkit.registry), before anything is loaded
    sections: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        sections = d.pop("sections")
        return {**d, **sections}                 # sections sit at the top level, as in YAML

    def section(self, name: str, cls):
        """The section `name` as its options dataclass `cls` (its defaults where not set)."""
        return _build(cls, self.sections.get(name, {}), f"recipe.{name}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, keep=()) -> "Recipe":
        """A mixed recipe (alloc not uniform) takes its `mixed:` values, except under the keys
        in `keep` (dotted, as with_overrides takes them: values given explicitly win)."""
        mixed = d.get("mixed") if isinstance(d, dict) and d.get("alloc", "uniform") != "uniform" else None
        if mixed and isinstance(mixed, dict):
            _check_mixed(mixed, {f.name for f in fields(cls)})
            d = _apply_mixed(d, mixed, keep)
        return _build(cls, d, "recipe")

    def with_overrides(self, **kw) -> "Recipe":
        """A copy with fields replaced; dotted keys ('calib.seqlen') reach nested sections. One
        that makes the recipe mixed brings in its `mixed:` values, except where this call or
        an earlier with_overrides gave one."""
        d = self.to_dict()
        given = {key: value for key, value in kw.items() if value is not None}
        for key, value in given.items():
            _put(d, key, value)
        keep = getattr(self, "_given", frozenset()) | set(given)
        out = Recipe.from_dict(d, keep=keep)
        out._given = keep                        # not a field: not saved, not compared
        return out


def _apply_mixed(d: dict, mixed: dict, keep=()) -> dict:
    """A copy of the recipe dict `d` without its `mixed:`, whose values replace d's where no
    key of `keep` claims them (_claimed)."""
    out = copy.deepcopy({k: v for k, v in d.items() if k != "mixed"})
    for key, value in _flatten(mixed).items():
        if not _claimed(key, keep):
            _put(out, key, value)
    return out


def _claimed(key: str, keep) -> bool:
    """Whether a mixed: value at `key` yields to one given explicitly: the key itself or a
    section above it; a group size given also claims bit_options (its options use it)."""
    return any(key == g or key.startswith(g + ".") for g in keep) or \
        (key == "bit_options" and "group_size" in keep)


def _put(d: dict, key: str, value) -> None:
    """d[key] = value, where a dotted key ('calib.seqlen') reaches a nested mapping."""
    *path, leaf = key.split(".")
    for p in path:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise QuantkitError(f"recipe: {key} reaches into {p}, which is a value, not a section")
    d[leaf] = value


def _flatten(d: dict, prefix: str = "") -> dict:
    """{'rsq': {'residual': False}} -> {'rsq.residual': False}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_config(cls, d: dict, where: str):
    """cls(**d) for an options dataclass; unknown keys are a clear error naming `where`."""
    return _build(cls, d, where)


def _build(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise QuantkitError(f"{where}: expected a mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls) if f.name != "sections"}
    sections = {k: v for k, v in d.items() if cls is Recipe and k not in known and isinstance(v, dict)}
    unknown = sorted(set(d) - set(known) - set(sections))
    if unknown:
        raise QuantkitError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(known)} (and the methods' sections)")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:                            # an options class with unresolvable hints
        hints = {}
    kw = {}
    for name, value in d.items():
        if name in sections:
            continue
        sub = {"calib": CalibConfig, "eval": EvalConfig}.get(name) if cls is Recipe else None
        if not sub and name in hints and not _fits(value, hints[name]):
            raise QuantkitError(f"{where}.{name}: {value!r} is not a valid {_type_name(hints[name])}")
        kw[name] = _build(sub, value, f"{where}.{name}") if sub else value
    if cls is Recipe and kw.get("mixed"):
        _check_mixed(kw["mixed"], set(known))
        _build(Recipe, _apply_mixed(d, kw["mixed"]), f"{where}.mixed")   # typed as the fields they replace
    for name, floor in _FLOORS.get(cls.__name__, {}).items():
        value = kw.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < floor \
                and not (name == "group_size" and value == -1):
            raise QuantkitError(f"{where}.{name}: {value} must be at least {floor}"
                                + (" (or -1: one group per row)" if name == "group_size" else ""))
    return cls(**kw, sections=sections) if cls is Recipe else cls(**kw)


def _check_mixed(mixed: dict, known: set) -> None:
    """A `mixed:` section names recipe fields or sections (a mapping each), nothing else."""
    fixed = {"mixed", "alloc", "model", "out"}
    bad = sorted(k for k, v in mixed.items()
                 if k in fixed or (k not in known and not isinstance(v, dict)))
    if bad:
        raise QuantkitError(f"recipe.mixed: {', '.join(bad)} cannot be set there; it takes recipe "
                            f"fields other than {', '.join(sorted(fixed))}, and the methods' sections")


# the smallest value a numeric field may take (bits are checked against each method's widths)
_FLOORS = {"CalibConfig": {"n_samples": 1, "seqlen": 1, "batch_size": 1, "table_samples": 1},
           "EvalConfig": {"seqlen": 1, "max_windows": 1},
           "Recipe": {"group_size": 1, "damp": 0, "bits": 0.5, "max_bops": 0}}


def _fits(value, hint) -> bool:
    """Whether a YAML value has the field's type (an int is a valid float, a bool is no number)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + \
            (" (or null)" if type(None) in args else "")
    return getattr(hint, "__name__", str(hint))


def find_recipe(name: str) -> Path | None:
    """recipes/NAME.yaml (from the working directory or the installed tree), or a YAML path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for d in RECIPE_DIRS:
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    return None


def load_recipe(name: str) -> Recipe:
    """The recipe called `name`; anything else is taken as a model with default settings."""
    path = find_recipe(name)
    if path is None:
        return Recipe(model=name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QuantkitError(f"{path}: invalid YAML ({e})") from e
    return Recipe.from_dict(data)
