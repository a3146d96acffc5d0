"""Optimizer: parameter groups, state, gradient accumulation, and the launch of compiled rules.

A subclass says *what* the update is; this class does the rest:

    class MyOpt(Optimizer):
        examples = {"momentum": (0.0, 0.9)}        # values that reach every structure (tools)
        def check_group(self, group): ...          # raise ValueError on a bad hyperparameter
        def structure(self, group): ...            # hashable: which terms are on
        def rule(self, structure, param_dtype, grad_dtype) -> UpdateRule: ...
        def scalars(self, group) -> dict: ...      # numeric hyperparameters, by rule scalar name

Slots of the rule other than "param" and "grad" are state buffers: created on a tensor's first
step, filled with the slot's `init` (zero unless the rule says otherwise; the rule's per-tensor
value `first` is then true), and stored in `self.state[param][slot]`.

`step()` never writes before everything is checked: every group's hyperparameters and kernel
arguments, then (when a launch table must be rebuilt) every tensor and state buffer, with new
state allocated aside and the memory of all groups checked for overlaps; only then is state
stored and are the kernels run, one launch per (group, param dtype, grad dtype). Launch tables are
cached and rebuilt only when a `.data` or `.grad` is reassigned, state is created or loaded, or
the structure changes. A launch is driven only through its declared methods (`Launch` in
`runtime.backend`).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import parameter as _parameter
from ..ir import (
    DType,
    Expr,
    Slot,
    UpdateRule,
    per_tensor,
    quantized,
    scales_of,
    stored_as,
    tensor,
    where,
    with_master,
    with_stochastic_rounding,
)
from ..ir.ops import RANDOM_MIX, Op
from ..parameter import Parameter
from ..runtime import arrays
from ..runtime.backend import Backend, Launch
from ..runtime.repoint import Program
from ..runtime.select import select_backend
from . import compact
from .exclusive import Exclusive


class _Required:
    def __repr__(self) -> str:
        return "<required parameter>"


required = _Required()
"""Sentinel default of a hyperparameter the user must give (like `lr`)."""


@dataclass
class _Batch:
    """One kernel bound to the tensors of one (group, dtype combination)."""

    rule: UpdateRule
    params: list[Parameter]
    launch: Launch
    first_column: int | None  # index of the per-tensor `first` flag, when the rule has one
    steps: np.ndarray | None = None  # per-tensor step counts (optimizers with counts_steps)
    first_set: bool = True  # some `first` flag may be 1: cleared after the next launch
    captured: bool = False  # counts and per-tensor values live on the device (capturable)
    rounding: np.ndarray | None = None  # tensor ids (uint64) of a stochastically rounded launch


@dataclass
class _Plan:
    """The cached launches of one group, valid while `token` is unchanged."""

    kind: str
    token: tuple  # what must not change for the plan to hold (see `_plans_for`)
    generation: int  # Parameter assignments seen (`parameter.generation`)
    addresses: tuple | None  # torch tensors: where each gradient and tensor lived
    batches: list[_Batch] = field(default_factory=list)
    params: frozenset = frozenset()  # those with a gradient, bound in `batches`
    members: frozenset = frozenset()  # every parameter of the group
    rows: dict = field(default_factory=dict)  # param -> (batch, row, index in group, .data)
    spans: Spans | None = None  # the memory it touches, one row per (tensor, slot)
    spans_offset: list[int] = field(default_factory=list)  # first row of each batch in `spans`
    moves: _Moves | None = None  # torch's gradients: how to re-point them in bulk


@dataclass
class _Moves:
    """Where the gradients of a step plan are bound in host tables, for re-pointing them at new
    gradients: per bound parameter, in (batch, row) order, its index in the group, its row in
    the plan's spans, its gradient's size in bytes; and the native program that checks every
    new address and writes them all in one call (`runtime.repoint`)."""

    index: np.ndarray  # [n] int64
    span_row: np.ndarray  # [n] int64
    nbytes: np.ndarray  # [n] uint64
    itemsize: np.ndarray  # [n] uint64
    cells: np.ndarray  # [n] uint64: where each gradient's address is stored
    program: Program
    written: int = -1  # the `_built` count the program's written ranges are from


@dataclass
class _FastStep:
    """A whole step of a torch training loop's steady state in one native call: every group's
    new gradients checked and re-pointed, then every launch run (all small enough for the
    calling thread). Valid while `key` holds (nothing rebuilt, no state created or loaded)."""

    key: tuple
    settings: list  # each group's `_Settings` whose scalars the kernels were checked against
    plans: list  # each group's step plan
    program: Program
    launches: list  # (launch, its calls_key) of each call the program makes
    scalars_set: bool = False  # the launches hold `settings`' kernel arguments


@dataclass
class _Settings:
    """A group's hyperparameters as last checked, and what they make: a copy of the group
    (None when a value is mutable, such as a tensor: `==` could not tell it changed) and the
    types of its values (`True == 1`, yet a flag set to 1 must be refused), its parameter list,
    its structure and kernel arguments, and the plan whose rules these arguments were last
    checked against."""

    snapshot: dict | None
    types: list
    params: list
    structure: tuple
    scalars: dict
    checked: _Plan | None = None


def _snapshot(group: dict) -> dict | None:
    """A copy of `group` that `==` tells apart from any later state of it (lists of plain
    values copied: torch's `param_names`), sharing its parameter list; None when a value could
    change unseen (a tensor, any other object)."""
    copy = dict(group)
    for key, value in group.items():
        if key == "params" or _immutable(value):
            continue
        if type(value) is list and all(map(_immutable, value)):
            copy[key] = list(value)
        else:
            return None
    return copy


def _types(group: dict) -> list:
    """The types of a group's values, and of the items of its tuples (betas)."""
    return [tuple(map(type, v)) if type(v) is tuple else type(v) for v in group.values()]


def _immutable(value) -> bool:
    kind = type(value)
    if kind is tuple:
        return all(map(_immutable, value))
    return kind in (float, int, bool, str, type(None))


@dataclass
class _Moved:
    """New gradients of one plan, checked and already written into its tables."""

    plan: _Plan
    ptrs: list  # every parameter's gradient address (0: none)

    def new(self) -> tuple[np.ndarray, np.ndarray]:
        """The bound gradients' addresses and ends, in `_Moves` order."""
        m = self.plan.moves
        new = np.array(self.ptrs, np.uint64)[m.index]
        return new, new + m.nbytes


@dataclass
class Spans:
    """Memory ranges of a plan's arrays: `table` rows are (start, end, written), `labels` say
    whose (group/parameter text, slot name) and are formatted only when two clash."""

    table: np.ndarray
    labels: list[tuple]


@dataclass
class _Draft:
    """A batch checked and ready to bind, with the state it would add (stored on commit)."""

    rule: UpdateRule
    params: list
    indices: list[int]  # of each parameter in its group
    per_tensor: np.ndarray
    first_column: int | None
    tensors: list[tuple] = field(default_factory=list)
    spans: list[tuple] = field(default_factory=list)
    new_state: list[tuple] = field(default_factory=list)  # (param, slot name, buffer or None:
    # delete the entry)
    new_accum: list[tuple] = field(default_factory=list)  # (param, buffer)


class Optimizer:
    """Base class of every stepjit optimizer (see the module docstring for the subclass API)."""

    unsigned_state: tuple[str, ...] = ()
    """State slots that are never negative (second moments): with `state_dtype="int8"` they use
    the unsigned code map, one more bit of range and precision; the others the signed one."""

    def __init__(self, params, defaults: dict, *, backend: str | None = None,
                 capturable: bool = False, state_dtype: str | None = None,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 rounding_seed: int = 0) -> None:
        """`params`: Parameters, or param-group dicts; `defaults`: every hyperparameter.

        The options every optimizer takes (a subclass passes them on as `**options`):
            backend: "llvm", "cuda" or "reference"; default: where the parameters live.
            capturable: on CUDA, keep step counts and per-tensor values on the device so that
                a step can be captured in a CUDA graph (docs/cuda.md); no effect elsewhere.
            state_dtype: how state buffers are stored: None (the compute type), "float32",
                "bfloat16" (half the memory) or "int8" (a quarter: 8-bit codes and a float32
                scale per block of 256, `optim.compact`); the arithmetic stays in the compute
                type.
            master_weights: keep a float32 copy of float16 and bfloat16 parameters in the
                state, which the update reads and writes; the parameter is its rounding.
            stochastic_rounding: round bfloat16 parameters stochastically (unbiased), from a
                random stream keyed by `rounding_seed`, the step and each element's index.
        """
        self._setup(defaults, [], {}, backend, capturable,
                    Storage(state_dtype, master_weights, stochastic_rounding, rounding_seed))
        if isinstance(params, (set, frozenset, dict)) or _is_tensor_like(params):
            raise TypeError(
                "params must be an iterable of Parameters or of param-group dicts, "
                f"got {arrays.type_name(params)}"
            )
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for g in groups:
            self.add_param_group(g)
        self._backend = self._select_backend()

    def _setup(self, defaults: dict, param_groups: list, state: dict, backend,
               capturable: bool = False, storage: Storage | None = None) -> None:
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {capturable!r}")
        self.capturable = capturable
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = param_groups
        self.state: dict = state
        self._accum: dict = {}  # accumulation buffers, kept across steps
        self._pending: frozenset = frozenset()  # params with accumulated gradients
        self._state_gen = 0  # bumped when state buffers are created or loaded
        self._plans: dict[tuple, _Plan] = {}
        self._rules: dict[tuple, UpdateRule] = {}
        self._requested_backend = backend
        self._untracked = False  # parameters whose .grad/.data change unannounced
        self._members = {p for g in param_groups for p in g["params"]}
        self._exclusive = Exclusive(type(self).__name__)
        self._step_count = None
        self._settings: list[_Settings] = []  # each group's, as of the last step
        self._fast: _FastStep | None = None  # the steady state's step in one native call
        self._built = 0  # plans stored so far: the key of `_written_spans`
        self._written: tuple | None = None
        self._store_as(storage or Storage())
        self._rounding_steps = 0  # steps taken: part of each stochastic rounding key

    @classmethod
    def over(cls, param_groups: list[dict], state: dict, *, backend: str | None = None,
             step_count=None, capturable: bool = False, storage: Storage | None = None):
        """An optimizer that works on existing `param_groups` and `state` containers, shared,
        not copied (`stepjit.torch` runs its kernels over a torch.optim.Optimizer's own).

        As in torch, a tensor that does not require grad is accepted (and skipped while it has
        no gradient), and so is one on the meta device (to be materialized before a step).
        `step_count`, when given, turns each parameter's step count (a 0-d float32 array that
        the optimizer updates in place) into what `state[p]["step"]` holds (torch: a tensor
        sharing its memory). `storage`: how state and parameters are stored (`Storage`)."""
        self = cls.__new__(cls)
        self._setup({}, param_groups, state, backend, capturable, storage)
        self._step_count = step_count
        for index, group in enumerate(param_groups):
            for i, p in enumerate(group["params"]):
                _check_param(f"param group {index}, parameter {i}", p, as_torch=True)
            self._check_group(index, group)
        self._untracked = any(arrays.is_parameter(p) for g in param_groups for p in g["params"])
        self._backend = self._select_backend()
        return self

    def share(self, param_groups: list[dict], state: dict) -> None:
        """Point at new containers (after torch's load_state_dict replaced them, or a group
        was added). Groups that are copies of the old ones holding the same parameter lists
        (hyperparameters read from tensors) keep the launch tables."""
        if state is not self.state or len(param_groups) != len(self.param_groups) or any(
                a["params"] is not b["params"] for a, b in zip(param_groups, self.param_groups)):
            self._members = {p for g in param_groups for p in g["params"]}
            self._state_gen += 1
        self.param_groups, self.state = param_groups, state

    def adopt_group(self, index: int, group: dict) -> None:
        """Check a group that the owner of the shared containers (see `over`) added as group
        `index`, and take it into account from the next call; raise, changing nothing, when
        one of its tensors or hyperparameters is not accepted."""
        for i, p in enumerate(group["params"]):
            _check_param(f"param group {index}, parameter {i}", p, as_torch=True)
        self._check_group(index, group)
        devices = {arrays.device(_array(p)) for p in group["params"]}
        if self._device is not None and not any(d.startswith("meta") for d in devices):
            select_backend(self._requested_backend, devices | {self._device})
        self._members.update(group["params"])
        self._state_gen += 1

    # -- the subclass interface ------------------------------------------------------------------
    examples: dict[str, tuple] = {}
    """Values of hyperparameters that together turn every term of the rule on and off (the
    tools enumerate the structures they reach: see `registry.structures`)."""

    counts_steps: bool = False
    """Keep a per-parameter step count in `state[param]["step"]` (Adam's bias corrections)."""

    def tensor_values(self, group: dict, step: np.ndarray | float) -> dict[str, np.ndarray]:
        """Per-tensor values for this step, computed on the host in float64 and vectorized over
        the tensors of one launch; `step` holds each tensor's step count, this step included: an
        array, or one float when every tensor of the launch is at that step (write it with
        numpy's functions and operators, which take both)."""
        return {}

    def tensor_formulas(self) -> dict[str, Expr]:
        """The values of `tensor_values` as IR, for steps that run without the host (a
        capturable CUDA step computes them on the device): float64 expressions of
        `per_tensor("step", F64)` (this step included) and of float64 `scalar`s named as the keys
        of `scalars(group)`. {} when there are no per-tensor values; a subclass with
        `tensor_values` and no formulas cannot be captured."""
        return {}

    def check_group(self, group: dict) -> None:
        """Raise ValueError when a hyperparameter of `group` is invalid."""

    def structure(self, group: dict) -> tuple:
        """The hashable structure of `group`'s configuration: which terms are on."""
        raise NotImplementedError

    def rule(self, structure: tuple, param_dtype: DType, grad_dtype: DType) -> UpdateRule:
        """The update rule for one structure and dtype combination (called once per optimizer
        for each; the base class keeps the result)."""
        raise NotImplementedError

    def scalars(self, group: dict) -> dict[str, float]:
        """The numeric hyperparameters of `group`, named as the rule's scalars."""
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The name of the backend in use: 'reference', 'llvm' or 'cuda'."""
        backend = self._chosen_backend()
        return "deferred" if backend is None else backend.name

    def add_param_group(self, param_group: dict) -> None:
        """Add a group: a dict with "params" and any hyperparameters that override the defaults."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {arrays.type_name(param_group)}")
        group = dict(param_group)
        params = group.get("params")
        if params is None:
            raise ValueError("a param group needs a 'params' entry")
        if isinstance(params, (set, frozenset, dict)):
            raise TypeError(f"group params must be a sequence, got {arrays.type_name(params)}")
        params = [params] if _is_param(params) else list(params)
        index = len(self.param_groups)
        if not params:
            raise ValueError(f"param group {index} has no parameters")
        for i, p in enumerate(params):
            _check_param(f"param group {index}, parameter {i}", p)
        if len(set(params)) != len(params) or not self._members.isdisjoint(params):
            raise ValueError(f"param group {index}: a parameter appears in more than one group")
        for name, default in self.defaults.items():
            if default is required and name not in group:
                raise ValueError(
                    f"param group {index}: parameter '{name}' is required (none given)"
                )
            group.setdefault(name, default)
        group.setdefault("lr_mult", 1.0)
        group.setdefault("decay_mult", 1.0)
        group["params"] = _ParamList(params)
        self._check_group(index, group)
        if hasattr(self, "_backend"):
            # the backend is chosen once for all params: a new group must live on the same device
            devices = {arrays.device(_array(p)) for p in params} | {self._device}
            select_backend(self._requested_backend, devices)
        kinds = {arrays.is_parameter(p) for p in params}
        if self.param_groups:
            kinds.add(self._untracked)
        if len(kinds) > 1:
            raise TypeError(f"param group {index}: an optimizer updates either torch tensors or "
                            "stepjit.Parameters, not both")
        self.param_groups.append(group)
        self._members.update(params)
        self._untracked = self._untracked or any(map(arrays.is_parameter, params))
        self._state_gen += 1

    def step(self, *, grad_scale: float = 1.0, lr_sources: Sequence = ()) -> None:
        """Update every parameter that has a gradient (or a pending accumulation).

        `grad_scale`: the factor the gradients were multiplied by (mixed precision's loss
        scale); the kernels divide it out as they read them, with no pass of their own. A group
        with `maximize` true ascends its objective (torch's flag): the gradient's sign flips
        the same way.

        `lr_sources` (capturable CUDA steps): per group, None or a 0-d float32 array on the
        device whose value multiplies the group's `lr` in every launch, read by the kernels
        themselves: a step captured in a CUDA graph follows a schedule written into it.

        A step is atomic from Python's point of view: it raises before anything is written, or
        it completes with all its bookkeeping (a Ctrl-C that arrives meanwhile is raised once
        the step is done). One optimizer is stepped by one thread at a time.
        """
        with self._exclusive:
            if lr_sources:
                self._check_lr_sources(lr_sources)
            pending = self._pending
            settings = self._settings_of_groups()
            if self._fast is not None and not pending and grad_scale == 1.0 and not lr_sources and (
                    self._step_fast(settings)):
                self._rounding_steps += 1
                return
            scalars = [s.scalars for s in settings]
            if grad_scale != 1.0:
                scalars = [self._unscaled(index, values, grad_scale)
                           for index, values in enumerate(scalars)]
            held: list = []  # every gradient the tables point at, until the kernels are done
            plans = self._plans_for("step", pending, scalars, settings, held)
            per_tensor = [self._tensor_values(index, group, plan) for index, (group, plan)
                          in enumerate(zip(self.param_groups, plans))]
            if self._fast is not None:  # the launches get this step's kernel arguments
                self._fast.scalars_set = False
            for index, (plan, values, tensor_values) in enumerate(zip(plans, scalars,
                                                                      per_tensor)):
                self._run(plan, values, tensor_values,
                          lr_sources[index] if index < len(lr_sources) else None)
            del held
            self._rounding_steps += 1
            if self._untracked and not pending and not self._fast_holds():
                self._fast = self._fast_step_of(settings)
            if pending:
                self._pending = frozenset()
                for plan in self._plans.values():  # the next accumulation copies, not adds
                    if plan.kind == "accumulate":
                        for b in plan.batches:
                            b.launch.set_per_tensor("first", 1.0)
                            b.first_set = True

    def accumulate_grad(self) -> None:
        """Add every gradient into its parameter's accumulation buffer (copy on the first call)."""
        with self._exclusive:
            pending = self._pending
            held: list = []
            plans = self._plans_for("accumulate", pending, held=held)
            for plan in plans:
                self._run(plan, {})
            del held
            added = pending.union(*(plan.params for plan in plans))
            if added != pending:
                self._pending = added

    def zero_grad(self, reset: bool = False) -> None:
        """Zero every `.grad` in place, or set it to None (`reset=True`) to release its memory.

        A pending accumulation is never touched.
        """
        with self._exclusive:
            if reset:
                for group in self.param_groups:
                    for p in group["params"]:
                        p.grad = None
                return
            held: list = []
            for plan in self._plans_for("zero", frozenset(), held=held):
                self._run(plan, {})

    def state_dict(self) -> dict:
        """State and hyperparameters in the torch.optim layout (buffers are copied)."""
        index = {}
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = [index.setdefault(p, len(index)) for p in g["params"]]
            groups.append(packed)
        state = {
            index[p]: {k: arrays.copy(v) for k, v in s.items()}
            for p, s in self.state.items()
            if p in index
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load `state_dict()` output; everything is checked before anything changes."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        saved_state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not isinstance(saved_state, dict):
            raise ValueError("state_dict needs 'state' (dict) and 'param_groups' (list)")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} param groups, the optimizer {len(self.param_groups)}"
            )
        by_index: dict[int, Parameter] = {}
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in saved["params"]):
                raise ValueError(f"state_dict: param group {gi} needs a 'params' list of "
                                 "parameter indices")
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"param group {gi}: state_dict has {len(saved['params'])} parameters, "
                    f"the optimizer {len(mine['params'])}"
                )
            by_index.update(zip(saved["params"], mine["params"]))
        new_state = {}
        for idx, buffers in saved_state.items():
            p = by_index.get(idx)
            if p is None:
                raise ValueError(f"state_dict has state for unknown parameter index {idx!r}")
            if not isinstance(buffers, dict):
                raise ValueError(f"state_dict: state of parameter {idx} must be a dict")
            new_state[p] = _loaded_state(idx, buffers, _array(p))
        new_groups = []
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            group = {**mine, **{k: v for k, v in saved.items() if k != "params"}}
            group["params"] = mine["params"]
            self._check_group(gi, group)
            new_groups.append(group)
        with self._exclusive:
            self.param_groups[:] = new_groups
            self.state = new_state
            self._state_gen += 1

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (backend={self.backend!r})"]
        for i, g in enumerate(self.param_groups):
            lines.append(f"  param group {i}: {len(g['params'])} parameters")
            for k, v in g.items():
                if k != "params":
                    lines.append(f"    {k}: {v}")
        return "\n".join(lines)

    # -- planning: checks and launch tables --------------------------------------------------------
    def _devices(self) -> set[str]:
        return {arrays.device(_array(p)) for g in self.param_groups for p in g["params"]}

    def _select_backend(self) -> Backend | None:
        """The backend for where the parameters live. Tensors on torch's meta device have no
        memory and take no part (deferred initialization); None while all of them are there."""
        devices = {d for d in self._devices() if not d.startswith("meta")}
        if not devices and any(True for g in self.param_groups for _ in g["params"]):
            self._device = None
            return None
        self._device = next(iter(devices), "cpu")
        return select_backend(self._requested_backend, devices)

    def _check_group(self, index: int, group: dict) -> None:
        try:
            # the per-group multipliers are the base class's: every optimizer has them
            check_number("lr_mult", group["lr_mult"])
            check_number("decay_mult", group["decay_mult"])
            if not isinstance(group.get("maximize", False), bool):  # torch's flag, every rule
                raise TypeError(f"Invalid maximize: {group['maximize']!r} (must be a bool)")
            self.check_group(group)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"param group {index}: {exc}") from None

    def _chosen_backend(self) -> Backend | None:
        """The backend, chosen now if the parameters were on the meta device until now (None
        while they all still are)."""
        if self._backend is None:
            self._backend = self._select_backend()
        return self._backend

    def _plans_for(self, kind: str, pending: frozenset, scalars: list[dict] | None = None,
                   settings: list[_Settings] | None = None,
                   held: list | None = None) -> list[_Plan]:
        """The launches for `kind` ('step', 'accumulate', 'zero') of every group (for a step:
        each group's kernel arguments, checked against the types the kernels compute in, and
        its settings). Torch's gradients, which the tables point at without holding them, are
        appended to `held`: the caller keeps them until its kernels are done (another thread's
        `zero_grad()` may drop them meanwhile).

        Tables are rebuilt in three phases, so that a failure anywhere changes nothing: every
        tensor and state buffer of every group is checked and missing state is allocated aside;
        the memory of all groups is checked for aliasing and every launch is bound; only then
        are the new state buffers, step counts and plans stored.
        """
        backend = self._chosen_backend()
        generation = _parameter.generation()
        ready: list[_Plan | None] = []
        todo, refreshed, moved = [], [], []
        for index, group in enumerate(self.param_groups):
            structure = settings[index].structure if kind == "step" else None
            params = group["params"]
            # the parameters themselves (a list edited in place), and the number of entries of
            # `state` (one deleted to start a parameter afresh)
            token = (self._state_gen, len(self.state), structure,
                     pending if kind == "step" else None, id(params), len(params))
            # torch sets .grad (and may move .data) behind our back: compare addresses
            addresses = arrays.addresses(params, held) if self._untracked else None
            plan = self._plans.get((kind, index))
            if plan is not None and plan.token == token:
                if plan.generation == generation and plan.addresses == addresses:
                    ready.append(plan)
                    continue
                staged = None
                if plan.moves is not None and not pending and plan.generation == generation:
                    staged = self._stage_moved(plan, addresses)  # torch's set_to_none loop
                    if staged is not None:  # checked in bulk: no overlap check below
                        ready.append(plan)
                        moved.append((plan, staged, generation, addresses))
                        continue
                staged = self._stage_refresh(kind, index, plan, pending, addresses)
                if staged is not None:
                    ready.append(plan)
                    refreshed.append((plan, staged, generation, addresses))
                    continue
            ready.append(None)
            todo.append((index, token, structure, addresses))
        drafts = {
            index: self._draft(kind, index, structure, pending)
            for index, _, structure, _ in todo
        }
        if held is not None:  # the arrays new tables and re-pointed ones are bound to
            held.append((drafts, refreshed))
        for index, values in enumerate(scalars or ()):
            if index in drafts:
                _check_scalars(index, [d.rule for d in drafts[index]], values)
            elif settings[index].checked is not ready[index] or values is not (
                    settings[index].scalars):  # new values, or rules: check them
                _check_scalars(index, [b.rule for b in ready[index].batches], values)
                if values is settings[index].scalars:
                    settings[index].checked = ready[index]
        if not todo and not refreshed:
            self._commit_refreshed(moved)
            return ready
        refreshed_spans = {id(plan): staged[0] for plan, staged, _, _ in refreshed}
        refreshed_spans.update({id(plan): _spans_with(plan, staged.new())
                                for plan, staged, _, _ in moved})
        for plan in ready:  # a re-pointed plan's spans hold the gradients it was built with
            if plan is not None and plan.moves is not None and id(plan) not in refreshed_spans:
                ptrs = np.array(plan.addresses[0], np.uint64)[plan.moves.index]
                refreshed_spans[id(plan)] = _spans_with(plan, (ptrs, ptrs + plan.moves.nbytes))
        built_spans = {index: _join_spans([d.spans for d in drafts[index]])
                       for index, _, _, _ in todo}
        if kind != "zero":  # zero_grad writes zeros: overlapping gradients are harmless there
            check_disjoint([refreshed_spans.get(id(plan), plan.spans) for plan in ready
                            if plan is not None] + list(built_spans.values()))
        built = {}
        for index, token, _, addresses in todo:
            params = self.param_groups[index]["params"]
            plan = _Plan(kind, token, generation, addresses, spans=built_spans[index],
                         members=frozenset(params))
            plan.spans_offset = list(np.cumsum([0] + [len(d.spans) for d in drafts[index]]))
            for d in drafts[index]:
                captured = kind == "step" and self._captures(backend)
                launch = self._bind(backend, d, captured)
                if self._untracked:  # the token's address check stands in for the references
                    launch.forget("grad")
                for j, (p, i) in enumerate(zip(d.params, d.indices)):
                    plan.rows[p] = (len(plan.batches), j, i, _array(p))
                rounding = (np.array([index << 32 | i for i in d.indices], np.uint64)
                            if "rounding_key" in d.rule.per_tensor_names else None)
                plan.batches.append(_Batch(d.rule, d.params, launch, d.first_column,
                                           captured=captured, rounding=rounding))
            plan.params = frozenset(plan.rows)
            if kind == "step" and self._untracked:
                plan.moves = _moves_of(plan)
            built[index] = plan
        # commit: nothing below can fail on bad input
        self._commit_refreshed(refreshed + moved)
        for index, plan in built.items():
            for d in drafts[index]:
                for p, name, buf in d.new_state:
                    if buf is None:  # scales of 8-bit state converted to a wider type
                        self.state[p].pop(name, None)
                    else:
                        self.state.setdefault(p, {})[name] = buf
                for p, buf in d.new_accum:
                    self._accum[p] = buf
                if d.new_accum:
                    self._state_gen += 1  # the step's tables read the accumulations
            if kind == "step" and self.counts_steps:
                for b in plan.batches:
                    b.steps = (self._device_step_counts(b) if b.captured
                               else self._step_counts(b.params))
            self._plans[(kind, index)] = ready[index] = plan
            self._built += 1
        entries = len(self.state)
        for plan in self._plans.values():  # new state entries are the plans' own
            plan.token = (plan.token[0], entries, *plan.token[2:])
        return ready

    @staticmethod
    def _commit_refreshed(refreshed: list) -> None:
        """Re-point the launches of refreshed plans (checked: nothing here fails on bad input)."""
        for plan, staged, generation, addresses in refreshed:
            if isinstance(staged, _Moved):  # written when checked: only the bookkeeping
                plan.generation, plan.addresses = generation, addresses
                continue
            spans, repoints = staged
            for b, rows, grads in repoints:
                plan.batches[b].launch.repoint("grad", rows, grads)
            plan.spans, plan.generation, plan.addresses = spans, generation, addresses

    def _stage_moved(self, plan: _Plan, addresses: tuple) -> _Moved | None:
        """`_stage_refresh` for torch's gradients in bulk: when the only change since the plan
        was refreshed is that gradients are new tensors of the same kind (strides, size, dtype;
        torch's `zero_grad()` frees them and backward makes new ones), what is left to check is
        their alignment and that none overlaps memory a step of any group writes: one native
        call, which also writes them into the tables (harmless if a later group fails: they
        then address the current gradients, checked). None when anything else changed
        (`_stage_refresh` or a rebuild then checks, and names a culprit)."""
        (ptrs, metas), old_metas = addresses, plan.addresses[1]
        if metas != old_metas:  # also: no gradient appeared or went away
            return None
        m = plan.moves
        if m.written != self._built:
            m.program.written(*self._written_spans())
            m.written = self._built
        return _Moved(plan, ptrs) if m.program(ptrs) else None

    def _written_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """The [start, end) of every non-empty range a step writes, over all groups, sorted
        (disjoint: checked when the plans were built)."""
        if self._written is None or self._written[0] != self._built:
            groups = len(self.param_groups)  # a removed group's plan is no one's
            tables = [p.spans.table for (kind, index), p in self._plans.items()
                      if kind == "step" and index < groups and p.spans is not None]
            t = np.concatenate(tables) if tables else np.zeros((0, 3), np.uint64)
            t = t[(t[:, 2] == 1) & (t[:, 1] > t[:, 0])]
            t = t[np.argsort(t[:, 0], kind="stable")]
            # the running maximum of the ends: the bisection then finds any overlap even if
            # ranges were to overlap each other
            self._written = (self._built, t[:, 0].copy(), np.maximum.accumulate(t[:, 1]))
        return self._written[1], self._written[2]

    def _stage_refresh(self, kind: str, index: int, plan: _Plan, pending: frozenset,
                       addresses: tuple | None):
        """When only some gradients were replaced (same dtypes, no gradient appeared or went
        away, no `.data` moved), check just those and say how to re-point the launches:
        (new spans, [(batch, rows, gradients)]). None when the plan must be rebuilt."""
        if not all(b.launch.can_repoint for b in plan.batches):
            return None
        changed = _changed_params(plan, addresses, self.param_groups[index]["params"])
        if changed is None:
            return None
        table = plan.spans.table.copy()
        moves: dict[int, tuple[list, list]] = {}
        for p in changed:
            loc = plan.rows.get(p)
            if loc is None:
                if p in plan.members and (p.grad is not None or p in pending):
                    return None  # a parameter gained a gradient: a new row
                continue
            b, j, i, bound_data = loc
            batch = plan.batches[b]
            k = [slot.name for slot in batch.rule.slots].index("grad")
            if kind != "zero" and _array(p) is not bound_data:
                return None  # .data moved: its state needs a check
            if kind == "step" and p in pending:
                if self._accum.get(p) is not batch.launch.held[j][k]:
                    return None
                continue  # its gradient is the accumulation, which did not move
            grad, data = p.grad, _array(p)
            if grad is None:
                return None  # a gradient went away: one row fewer
            where_ = f"param group {index}, parameter {i}"
            if kind == "zero":  # the table holds the old gradient's size: keep to it
                bound = batch.launch.held[j][k]  # None for torch, whose gradients fit .data
                size = arrays.numel(data if bound is None else bound)
                if (_check_gradient(where_, grad) is not batch.rule.slots[k].dtype
                        or tuple(grad.shape) != tuple((data if bound is None else bound).shape)
                        or arrays.numel(grad) != size):
                    return None
            else:
                _, gd, (_, span) = _check_tensor_pair(where_, data, grad)
                if gd is not batch.rule.slots[k].dtype:
                    return None
                row = plan.spans_offset[b] + j * len(batch.rule.slots) + k
                table[row, 0], table[row, 1] = span
            rows, grads = moves.setdefault(b, ([], []))
            rows.append(j)
            grads.append(grad)
        spans = Spans(table, plan.spans.labels)
        return spans, [(b, rows, grads) for b, (rows, grads) in moves.items()]

    def _draft(self, kind: str, index: int, structure, pending: frozenset) -> list[_Draft]:
        """Check one group's tensors and state and say what its launches need, changing nothing."""
        group = self.param_groups[index]
        by_dtypes: dict[tuple[DType, DType], list] = {}
        for i, p in enumerate(group["params"]):
            where_ = f"param group {index}, parameter {i}"
            accumulated = kind == "step" and p in pending
            grad = self._accum[p] if accumulated else p.grad
            if grad is None:
                continue
            data = _array(p)
            if arrays.device(data).startswith("meta"):
                raise RuntimeError(
                    f"{where_}: `fused=True` requires all the params to be floating point "
                    "Tensors of supported devices (cpu, cuda), and stepjit's step is always "
                    "fused: this one is on the meta device; materialize the parameters first "
                    "(module.to_empty(device=...)), then make the optimizer")
            if arrays.device(data) != self._device:
                raise ValueError(f"{where_}: parameter is on {arrays.device(data)}, but the "
                                 f"optimizer runs on {self._device} (backend {self.backend!r})")
            if kind == "zero":
                pd = gd = _check_gradient(where_, grad)
                spans = ()
            else:
                what = "accumulated gradient" if accumulated else "gradient"
                pd, gd, spans = _check_tensor_pair(where_, data, grad, what)
            by_dtypes.setdefault((pd, gd), []).append((where_, i, p, data, grad, spans))
        drafts = []
        for (pd, gd), items in by_dtypes.items():
            if kind == "zero":
                rule = _zero_rule(gd)
            elif kind == "accumulate":
                rule = _accumulate_rule(pd.compute, gd)
            else:
                rule = self._rules.get((structure, pd, gd))
                if rule is None:  # trace once per structure: rebuilds of the table reuse it
                    try:
                        rule = self._stored(self.rule(structure, pd, gd))
                    except ValueError as exc:  # a storage the parameters cannot have
                        raise ValueError(f"param group {index}: {exc}") from None
                    self._rules[(structure, pd, gd)] = rule
            drafts.append(self._draft_batch(kind, index, rule, items, pending))
        return drafts

    def _draft_batch(self, kind: str, index: int, rule: UpdateRule, items: list,
                     pending: frozenset):
        """The tensors of one launch, state checked against its parameter, new state aside."""
        names = rule.per_tensor_names
        col = names.index("first") if "first" in names else None
        pt = np.zeros((len(items), len(rule.per_tensor)), np.float64)
        d = _Draft(rule, [item[2] for item in items], [item[1] for item in items], pt, col)
        group = self.param_groups[index]
        for j, (where_, _, p, data, grad, spans) in enumerate(items):
            found = {"param": data, "grad": grad}
            if kind == "accumulate":
                buf = self._accum.get(p)
                want = rule.slot("accum").dtype
                if p in pending:  # a sum in progress: it must fit the parameter
                    buf, new = _state_array(where_, "accumulated gradient", buf, data, want)
                else:  # scratch: reuse it when it fits, else start a new one
                    pt[j, col] = 1.0
                    new = buf is None or not _fits(buf, data, want)
                    if new:
                        buf = arrays.zeros_as(data, want)
                if new:
                    d.new_accum.append((p, buf))
                found["accum"] = buf
            elif kind == "step":
                st = self.state.get(p, {})
                for slot in rule.slots[2:]:  # the state buffers
                    if slot.per_block:  # 8-bit scales: with their codes
                        continue
                    if slot.code_map:
                        (codes, scales), new = compact.state_pair(where_, st, slot, data, group)
                        found[slot.name], found[scales_of(slot.name)] = codes, scales
                        if new:
                            d.new_state += [(p, slot.name, codes),
                                            (p, scales_of(slot.name), scales)]
                        continue
                    buf = st.get(slot.name)
                    widened = buf is not None and scales_of(slot.name) in st
                    if widened:  # 8-bit state, now kept wider
                        compact.check_pair(where_, slot.name, buf, st[scales_of(slot.name)],
                                           tuple(data.shape))
                        buf = compact.dequantize(buf, st[scales_of(slot.name)])
                        d.new_state.append((p, scales_of(slot.name), None))
                    if slot.init == "param" and buf is not None and _stale_copy(buf, data):
                        buf = None  # the parameter was written since: the copy starts anew
                    if buf is None:
                        buf = _new_state(data, slot, group)
                        d.new_state.append((p, slot.name, buf))
                        if col is not None and slot.init != "param":  # a new master copy
                            pt[j, col] = 1.0  # is no first step: momentum may be loaded
                    else:
                        # a loaded buffer may be in another dtype (torch keeps half state as
                        # half) or layout: a copy of it that fits is stored instead
                        buf, new = _state_array(where_, f"state {slot.name!r}", buf, data,
                                                slot.dtype)
                        if new or widened:
                            d.new_state.append((p, slot.name, buf))
                    found[slot.name] = buf
            arrays_ = tuple(found[s.name] for s in rule.slots)
            d.tensors.append(arrays_)
            if kind == "zero":
                continue
            # one row per slot, in slot order; where_ and the slot are formatted only on a clash
            known = dict(zip(("param", "grad"), spans))
            for slot, a in zip(rule.slots, arrays_):
                start, end = known.get(slot.name) or arrays.byte_span(a)
                d.spans.append((start, end, slot.written, where_, slot.name))
        return d

    def _store_as(self, storage: Storage) -> None:
        """From the next table built, store state and parameters as `storage` says."""
        storage.check()
        self.storage = storage
        self.state_dtype, self.master_weights = storage.state_dtype, storage.master_weights
        self._storage = _state_storage(storage.state_dtype)
        self._rules = {}
        self._state_gen += 1

    def _stored(self, rule: UpdateRule) -> UpdateRule:
        """`rule` with a master copy of a half parameter (`master_weights`), its parameter
        rounded stochastically (`stochastic_rounding`) and its state buffers kept in
        `state_dtype` (the master copy stays in the compute type)."""
        if self.master_weights and rule.slot("param").dtype.is_half:
            rule = with_master(rule)
        if self.storage.stochastic_rounding:
            rule = with_stochastic_rounding(rule)  # ValueError unless bfloat16 parameters
        storage = self._storage
        dtypes = {s.name: storage for s in rule.slots[2:]
                  if storage not in (None, s.dtype) and s.init != "param"}
        if not dtypes:
            return rule
        if storage is DType.U8:  # 8 bits: codes and block scales (`ir.quantized`)
            maps = {name: "unsigned" if name in self.unsigned_state else "signed"
                    for name in dtypes}
            return quantized(rule, maps, f"{rule.name}_state_int8")
        return stored_as(rule, dtypes, f"{rule.name}_state_{storage}")

    def _captures(self, backend: Backend) -> bool:
        """Whether steps keep their counts and per-tensor values on the device (capturable)."""
        return self.capturable and backend.name == "cuda"

    def _rounding_keys(self, b: _Batch) -> np.ndarray:
        """This step's stochastic rounding key of each tensor of `b` (see `rounding_keys`):
        from each parameter's own step count where the optimizer keeps one (it is in every
        checkpoint, so a resumed run continues the streams), else from this optimizer's."""
        steps = self._rounding_steps if b.steps is None else b.steps.astype(np.uint64)
        return rounding_keys(self.storage.rounding_seed, b.rounding, steps)

    def _bind(self, backend: Backend, d: _Draft, captured: bool) -> Launch:
        if captured and "rounding_key" in d.rule.per_tensor_names:
            raise ValueError("stochastic rounding draws new keys on the host every step, so a "
                             "capturable step cannot use it yet (capturable=False, or round "
                             "to nearest with master_weights=True)")
        if not captured:
            return backend.bind(backend.compile(d.rule), d.tensors, d.per_tensor)
        # the kernels count steps on the device from these: the parameters' own counts, or for
        # an optimizer without (SGD's momentum) 0 where the buffer is new, so `first` is right
        if self.counts_steps:
            backend.settle()  # counts of an earlier capturable plan may still be in flight
            counts = [float(self.state.get(p, {}).get("step", 0)) for p in d.params]
        elif d.first_column is not None:
            counts = 1.0 - d.per_tensor[:, d.first_column]
        else:
            counts = np.zeros(len(d.params))
        steps = arrays.zeros(d.tensors[0][0], (len(d.params),), DType.F32)
        arrays.assign(steps, np.asarray(counts, np.float32))
        kernel = backend.compile(d.rule, formulas=self.tensor_formulas())
        return backend.bind(kernel, d.tensors, d.per_tensor, steps=steps)

    def _check_lr_sources(self, sources: Sequence) -> None:
        """Raise before anything runs unless each of `sources` is None or a device lr that the
        captured kernels of its group can read."""
        if len(sources) > len(self.param_groups):
            raise ValueError(f"{len(sources)} lr sources for {len(self.param_groups)} groups")
        backend = self._chosen_backend()
        for index, source in enumerate(sources):
            if source is None:
                continue
            where = f"param group {index}: the device lr"
            if backend is None or not self._captures(backend):
                raise ValueError(f"{where} is read only by capturable steps on the CUDA backend "
                                 f"(capturable={self.capturable}, backend "
                                 f"{self.backend!r}): pass a number instead")
            if not arrays.is_array(source):
                raise ValueError(f"{where} must be an array, got {arrays.type_name(source)}")
            if arrays.numel(source) != 1 or arrays.dtype(source) is not DType.F32:
                raise ValueError(f"{where} must be one float32 element, got "
                                 f"{arrays.numel(source)} of {arrays.dtype(source)}")
            devices = {arrays.device(_array(p)) for p in self.param_groups[index]["params"]}
            if {arrays.device(source)} != devices:
                raise ValueError(f"{where} is on {arrays.device(source)}, the parameters on "
                                 f"{', '.join(sorted(devices))}")

    def _device_step_counts(self, b: _Batch):
        """A captured batch's counts: each state["step"] becomes a 0-d view of the device array
        its kernels advance (torch's capturable optimizers keep theirs on the device too)."""
        steps = b.launch.steps
        for j, p in enumerate(b.params):
            self.state.setdefault(p, {})["step"] = steps[j]
        return steps

    def _step_counts(self, params: list) -> np.ndarray:
        """One array of step counts for a batch; each state["step"] becomes a 0-d view into it,
        so counting a step is one vectorized `+= 1` whatever the number of tensors. Counts are
        float32, as torch keeps them (exact up to 2**24 steps)."""
        steps = np.array([float(self.state.get(p, {}).get("step", 0)) for p in params],
                         np.float32)
        wrap = self._step_count
        for j, p in enumerate(params):
            view = steps[j : j + 1].reshape(())
            self.state.setdefault(p, {})["step"] = view if wrap is None else wrap(view)
        return steps

    def _fast_key(self) -> tuple:
        return (self._state_gen, len(self.state), self._built, _parameter.generation())

    def _fast_holds(self) -> bool:
        """Whether `_fast` still describes the plans and launches (not whether a step may take
        it: `_step_fast` checks the rest)."""
        fast = self._fast
        return fast is not None and fast.key == self._fast_key() and all(
            launch.calls_key() == key for launch, key in fast.launches)

    def _fast_step_of(self, settings: list[_Settings]) -> _FastStep | None:
        """The whole step in one native call, when every group's plan re-points torch's
        gradients natively and every launch can be run from native code; else None."""
        plans = [self._plans.get(("step", i)) for i in range(len(self.param_groups))]
        if any(plan is None or plan.moves is None for plan in plans):
            return None
        calls, keys = [], []
        for plan in plans:
            for b in plan.batches:
                found = b.launch.native_calls()
                if found is None:
                    return None
                calls += found
                keys.append((b.launch, b.launch.calls_key()))
        index, offset = [], 0
        for plan in plans:
            index.append(plan.moves.index + offset)
            offset += len(plan.addresses[0])
        join = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts
                else np.zeros(0, dt))
        program = Program(join(index, np.int64), join([p.moves.cells for p in plans], np.uint64),
                          join([p.moves.nbytes for p in plans], np.uint64),
                          join([p.moves.itemsize for p in plans], np.uint64), calls)
        program.written(*self._written_spans())
        return _FastStep(self._fast_key(), list(settings), plans, program, keys)

    def _step_fast(self, settings: list[_Settings]) -> bool:
        """A step through `_fast` when nothing but gradient addresses and kernel arguments
        changed since it was made: checks as the full path does them, kernel arguments written,
        then one native call. False, having changed nothing, when the full path must run."""
        fast = self._fast
        if not self._fast_holds() or len(settings) != len(fast.settings):
            return False
        for index, (now, then) in enumerate(zip(settings, fast.settings)):
            if now is not then:  # new kernel arguments: checked against the kernels' types
                if now.structure != then.structure:
                    return False
                _check_scalars(index, [b.rule for b in fast.plans[index].batches], now.scalars)
        ptrs, found, held = [], [], []  # held: the gradients read, until the kernels are done
        for group, plan in zip(self.param_groups, fast.plans):
            addresses = arrays.addresses(group["params"], held)
            if addresses[1] != plan.addresses[1]:
                return False
            ptrs += addresses[0]
            found.append(addresses)
        per_tensor = [self._tensor_values(index, group, plan) for index, (group, plan)
                      in enumerate(zip(self.param_groups, fast.plans))]
        same = fast.scalars_set and all(map(operator.is_, settings, fast.settings))
        for plan, values, extra in zip(fast.plans, settings, per_tensor):
            for b, more in zip(plan.batches, extra):
                if not same:
                    b.launch.set_scalars(tuple(values.scalars[n] for n in b.rule.scalar_names))
                if b.rounding is not None:
                    b.launch.set_per_tensor("rounding_key", self._rounding_keys(b))
                for name, column in (more[1].items() if more is not None else ()):
                    b.launch.set_per_tensor(name, column)
        fast.settings, fast.scalars_set = list(settings), True
        if not fast.program(ptrs):
            return False  # a new gradient failed a check: the full path names it
        del held
        for plan, addresses, extra in zip(fast.plans, found, per_tensor):
            plan.addresses = addresses
            for b, more in zip(plan.batches, extra):
                if more is not None:
                    b.steps[:] = more[0]  # in place: each state["step"] is a view into it
        return True

    def _settings_of_groups(self) -> list[_Settings]:
        """Each group's checked settings: those of the last step when its hyperparameters are
        the same values (one dict comparison), else checked and computed anew."""
        found = []
        cache = self._settings
        for index, group in enumerate(self.param_groups):
            known = cache[index] if index < len(cache) else None
            if (known is None or known.snapshot is None or group["params"] is not known.params
                    or group != known.snapshot or _types(group) != known.types):
                self._check_group(index, group)
                values = self.scalars(group)
                if group.get("maximize"):
                    values = self._unscaled(index, values, -1.0)
                known = _Settings(_snapshot(group), _types(group),
                                  group["params"], self.structure(group), values)
            found.append(known)
        self._settings = found
        return found

    def _unscaled(self, index: int, values: dict[str, float], grad_scale: float) -> dict:
        """Kernel arguments `values` with the gradients' factor divided out of `scale`."""
        if "scale" not in values:
            raise TypeError(f"param group {index}: {type(self).__name__}'s rule has no gradient "
                            "'scale' argument, so it cannot maximize or unscale gradients (start "
                            "the rule from optim.prologue)")
        return {**values, "scale": values["scale"] / grad_scale}

    def _tensor_values(self, index: int, group: dict, plan: _Plan) -> list:
        """Each batch's (step counts, per-tensor values) for this step, checked, or None.

        When every tensor of a batch is at the same step (they are stepped together), the
        values are computed once, as Python floats: a handful of numpy calls per step cost more
        than the arithmetic, above all right after backward, when the caches are cold."""
        out = []
        for b in plan.batches:
            if b.steps is None or b.captured:
                out.append(None)
                continue
            counts = b.steps.tolist()
            if counts and counts.count(counts[0]) == len(counts):
                steps = counts[0] + 1.0
            else:
                steps = b.steps.astype(np.float64) + 1.0  # float64: the host computes in it
            values = self.tensor_values(group, steps)
            for name, dt, _, high in _limits(b.rule, Op.PER_TENSOR):
                v = values.get(name)
                if v is not None and not (abs(v) <= high if isinstance(v, float)
                                          else np.all(np.abs(v) <= high)):  # inf and NaN too
                    raise ValueError(f"param group {index}: per-tensor value {name} "
                                     f"({np.asarray(v).ravel()[:3]}...) cannot be represented "
                                     f"in {dt}, the type the kernel computes in")
            out.append((steps, values))
        return out

    def _run(self, plan: _Plan, scalars: dict[str, float], per_tensor: list | None = None,
             lr_source=None) -> None:
        for b, extra in zip(plan.batches, per_tensor or [None] * len(plan.batches)):
            if b.rounding is not None:
                b.launch.set_per_tensor("rounding_key", self._rounding_keys(b))
            if b.captured:  # counts, per-tensor values and a device lr: the kernels' own
                b.launch.set_inputs(scalars, lr_source)
                b.launch(tuple(scalars[n] for n in b.rule.scalar_names))
                continue
            if extra is not None:
                for name, values in extra[1].items():
                    b.launch.set_per_tensor(name, values)
            b.launch(tuple(scalars[n] for n in b.rule.scalar_names))
            if extra is not None:
                b.steps[:] = extra[0]  # in place: each state["step"] is a view into it
            if b.first_column is not None and b.first_set:
                # the first step of these tensors is done: later launches reuse the table
                b.launch.set_per_tensor("first", 0.0)
                b.first_set = False


class _ParamList(list):
    """A group's parameter list: editing it in place is an assignment the tables notice."""

    def _edited(name):  # noqa: N805 - builds the methods below
        def method(self, *args):
            _parameter._bump()  # an unlogged change: the next call rebuilds the tables
            return getattr(list, name)(self, *args)

        method.__name__ = name
        return method

    for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend",
                  "insert", "pop", "remove", "clear", "sort", "reverse"):
        locals()[_name] = _edited(_name)
    del _name, _edited


@dataclass(frozen=True)
class Storage:
    """How an optimizer stores state and parameters (its constructor's keyword arguments)."""

    state_dtype: str | None = None  # None, or a name of STATE_DTYPES
    master_weights: bool = False  # a float32 copy of half parameters (`ir.with_master`)
    stochastic_rounding: bool = False  # bfloat16 parameters (`ir.with_stochastic_rounding`)
    rounding_seed: int = 0  # the first part of every rounding key

    def check(self) -> None:
        _state_storage(self.state_dtype)
        for name in ("master_weights", "stochastic_rounding"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        seed = self.rounding_seed
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (
                0 <= seed < 2**64):
            raise ValueError(f"rounding_seed must be an integer in [0, 2**64), got {seed!r}")


def rounding_keys(seed: int, ids: np.ndarray, step) -> np.ndarray:
    """The stochastic rounding key of each tensor (`ids`: uint64, one per tensor) at `step`
    (one count, or a uint64 array of each tensor's):
    SplitMix64's finalizer of the three mixed together, as float64 integers below 2**53 (the
    kernels then draw 16 bits per element from the key and the element's index). The same
    seed, parameters and steps give the same keys, hence the same rounding, on every backend
    and thread count."""
    with np.errstate(over="ignore"):  # 64-bit arithmetic wraps, as it should
        z = (np.uint64(int(seed) % 2**64) * RANDOM_MIX[0] + ids * RANDOM_MIX[1]
             + (np.uint64(step % 2**64) if isinstance(step, int) else step) * RANDOM_MIX[2])
        z = (z ^ (z >> np.uint64(30))) * RANDOM_MIX[1]
        z = (z ^ (z >> np.uint64(27))) * RANDOM_MIX[2]
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64)


STATE_DTYPES = {"float32": DType.F32, "bfloat16": DType.BF16, "int8": DType.U8}
"""How state buffers may be stored (`state_dtype=`); None keeps them in the compute type."""


def float32_state(state_dict: dict) -> dict:
    """A copy of `state_dict` (from either face, any library's arrays) whose float16 and
    bfloat16 state buffers, and 8-bit codes with their scales (`optim.compact`), are float32,
    for tools that expect full-precision state; other entries are shared, not copied. Loading a
    compact checkpoint needs no such call: every optimizer converts buffers to its own storage
    type."""
    def widened(value):
        if arrays.is_array(value) and arrays.dtype(value) in (DType.F16, DType.BF16):
            out = arrays.zeros_as(value, DType.F32)
            arrays.assign(out, value)
            return out
        return value

    state = {index: {name: widened(v) for name, v in compact.float32_buffers(buffers).items()}
             for index, buffers in state_dict["state"].items()}
    return {**state_dict, "state": state}


def _state_storage(state_dtype) -> DType | None:
    if state_dtype is None:
        return None
    found = STATE_DTYPES.get(state_dtype) if isinstance(state_dtype, str) else None
    if found is None:
        raise ValueError(f"unknown state_dtype {state_dtype!r}: choose None (the compute type), "
                         f"{', '.join(map(repr, STATE_DTYPES))}")
    return found


def _is_integer(x) -> bool:
    """Whether array x holds integers (a state buffer may be loaded from them, not from bools
    or complex numbers)."""
    if arrays.is_torch(x):
        dt = x.dtype
        return not (dt.is_floating_point or dt.is_complex) and dt != x.bool().dtype
    return x.dtype.kind in ("i", "u")


def _loaded_state(idx, buffers: dict, data) -> dict:
    """Private copies of one parameter's saved state (`_loaded_buffer`); 8-bit codes and their
    scales are checked as a pair and copied as they are (converted when tables are built if
    they do not fit the parameter: another device or layout)."""
    out = {}
    for name, buf in buffers.items():
        scales = buffers.get(scales_of(name))
        if scales is not None and name != "step":
            compact.check_pair(f"state_dict: parameter {idx}", name, buf, scales,
                               tuple(data.shape))
            out[name], out[scales_of(name)] = arrays.copy(buf), arrays.copy(scales)
    for name, buf in buffers.items():
        if name not in out:
            out[name] = _loaded_buffer(idx, name, buf, data)
    return out


def _loaded_buffer(idx, name: str, buf, data):
    """A private copy of state buffer `name` of parameter `idx` from a state dict, in the
    parameter's compute type, or ValueError naming what does not fit."""
    where_ = f"state_dict: {name} of parameter {idx}"
    if name == "step":
        try:
            return np.array(float(buf))
        except (TypeError, ValueError):
            raise ValueError(f"{where_} must be a number, got {buf!r}") from None
    host = buf if arrays.is_array(buf) else np.asarray(buf)
    if arrays.dtype(host) is None and not _is_integer(host):
        raise ValueError(f"{where_} has dtype {host.dtype}; state buffers are real numbers")
    if tuple(host.shape) != tuple(data.shape):
        raise ValueError(
            f"{where_} has shape {tuple(host.shape)}, the parameter {tuple(data.shape)}"
        )
    dt = arrays.dtype(data)
    new_buf = arrays.zeros_as(data, (dt or DType.F32).compute)
    arrays.assign(new_buf, host)
    return new_buf


_LIMITS: dict[tuple, tuple] = {}


def _limits(rule: UpdateRule, leaf: Op = Op.SCALAR) -> tuple:
    """(name, dtype, smallest normal, largest finite) of each `leaf` value (a kernel argument,
    or a per-tensor value) that is computed in, or cast to, a type narrower than float64."""
    found = _LIMITS.get((rule, leaf))
    if found is None:
        narrow = {}
        for n in rule.nodes:
            source = n.src[0] if n.op is Op.CAST and n.src[0].op is leaf else n
            if source.op is leaf and n.dtype.is_float and n.dtype is not DType.F64:
                narrow.setdefault((source.arg, n.dtype), None)
        found = []
        for name, dt in narrow:
            info = np.finfo(dt.to_numpy())
            found.append((name, dt, float(info.smallest_normal), float(info.max)))
        found = _LIMITS[(rule, leaf)] = tuple(found)
    return found


def _check_scalars(index: int, rules: list[UpdateRule], values: dict[str, float]) -> None:
    """Raise ValueError for a kernel argument that the type it is computed in cannot hold: one
    that would become infinite, or so small it would be a denormal or zero."""
    for name, value in values.items():
        if not math.isfinite(value):  # e.g. lr * lr_mult beyond float64
            raise ValueError(f"param group {index}: {name} = {value} is not finite (a product of "
                             "hyperparameters, such as lr * lr_mult, overflowed)")
    for rule in rules:
        for name, dt, low, high in _limits(rule):
            v = abs(values[name])
            if v > high or 0 < v < low:
                raise ValueError(
                    f"param group {index}: {name} = {values[name]:g} cannot be represented in "
                    f"{dt}, the type the kernel computes in (magnitudes from {low:.3g} to "
                    f"{high:.3g}, or 0)"
                )


def _is_tensor_like(x: object) -> bool:
    return isinstance(x, Parameter) or arrays.is_array(x) or hasattr(x, "__dlpack__")


def _is_param(x: object) -> bool:
    return isinstance(x, Parameter) or arrays.is_parameter(x)


def _array(p):
    """The array holding a parameter's values: a Parameter's `.data`, or the tensor itself."""
    return p.data if isinstance(p, Parameter) else p


def _check_param(where_: str, p, as_torch: bool = False) -> None:
    if not isinstance(p, Parameter):
        arrays.check_parameter(where_, p, as_torch)


def _check_gradient(where_: str, grad) -> DType:
    """Check a gradient that zero_grad() writes into."""
    if arrays.dtype(grad) is None:
        raise TypeError(f"{where_}: gradient dtype {grad.dtype} is not a floating type")
    aligned = arrays.data_ptr(grad) % arrays.itemsize(grad) == 0
    if not (arrays.is_writeable(grad) and arrays.is_dense(grad) and aligned):
        raise ValueError(f"{where_}: gradient must be writeable, dense and aligned to zero it")
    return arrays.dtype(grad)


def _check_tensor_pair(where_: str, data, grad, what: str = "gradient") -> tuple:
    """Check a parameter and its gradient for a step: their dtypes, and the [start, end) of the
    bytes of each."""
    da, ga = arrays.adapter(data), arrays.adapter(grad)
    if ga is None:
        raise TypeError(f"{where_}: {what} is a {arrays.type_name(grad)}, not an array")
    for name, arr, a in (("parameter", data, da), (what, grad, ga)):
        if (problem := a.unsupported(arr)) is not None:
            raise ValueError(f"{where_}: {name}: {problem}")
    pd, gd = da.dtype(data), ga.dtype(grad)
    for name, arr, dt in (("parameter", data, pd), (what, grad, gd)):
        if dt is None:
            raise TypeError(f"{where_}: {name} dtype {arr.dtype} is not a floating type "
                            "(float16, bfloat16, float32 or float64)")
    if tuple(grad.shape) != tuple(data.shape):
        raise ValueError(f"{where_}: {what} shape {tuple(grad.shape)} differs from the "
                         f"parameter's {tuple(data.shape)}")
    if ga.device(grad) != da.device(data):
        raise ValueError(f"{where_}: {what} is on {ga.device(grad)}, the parameter on "
                         f"{da.device(data)}")
    if not da.writeable(data):
        raise ValueError(f"{where_}: parameter is read-only")
    spans = []
    layouts = []
    for name, arr, a in (("parameter", data, da), (what, grad, ga)):
        layouts.append(a.contiguous(arr) or arrays.layout(arr))
        if not layouts[-1]:
            raise ValueError(f"{where_}: {name} has gaps or overlaps in memory (strides "
                             f"{a.strides(arr)}); pass a dense array (numpy.ascontiguousarray, "
                             "torch's .contiguous())")
        start, size = a.data_ptr(arr), a.itemsize(arr)
        if start % size:
            raise ValueError(f"{where_}: {name} is not aligned to its element size; "
                             "copy it (numpy.require(a, requirements='A'))")
        spans.append((start, start + a.numel(arr) * size))
    if layouts[0] is not layouts[1] and arrays.layout(data) != arrays.layout(grad):
        raise ValueError(f"{where_}: the {what} is laid out differently from the parameter "
                         f"(strides {ga.strides(grad)}, the parameter's {da.strides(data)}); an "
                         "elementwise update needs both in one memory order: make them match "
                         "(e.g. .contiguous(memory_format=...))")
    if arrays.overlap(*spans):
        raise ValueError(f"{where_}: parameter and {what} share memory")
    return pd, gd, spans


def _new_state(data, slot: Slot, group: dict):
    """A new state buffer for parameter array `data` (its layout), filled with the slot's
    initial value."""
    buf = arrays.zeros_as(data, slot.dtype)
    if slot.init == "param":  # a master copy
        arrays.assign(buf, data)
        return buf
    value = group[slot.init] if isinstance(slot.init, str) else slot.init
    if value:
        buf[...] = float(value)
    return buf


_SLOT_NAMES = {"param": "parameter", "grad": "gradient", "accum": "accumulated gradient"}


def _stale_copy(master, data) -> bool:
    """Whether a master copy no longer rounds to its parameter (the parameter was written
    since the last step: loaded weights, or a copy saved by an optimizer without master
    weights and loaded back). Read when tables are built, not at every step."""
    if arrays.is_torch(master) or arrays.is_torch(data):
        t = arrays._torch()
        rounded = t.as_tensor(master).to(device=data.device, dtype=data.dtype)
        return bool((rounded != data.detach()).any())
    return bool((master.astype(data.dtype) != data).any())


def _fits(buf, data, dt: DType) -> bool:
    """Whether `buf` can be a state buffer of parameter array `data` as it is: same library,
    device, shape and layout, dtype `dt`, native, writeable and aligned."""
    a = arrays.adapter(buf)
    return (
        a is not None
        and a.dtype(buf) is dt
        and buf.shape == data.shape
        and a.name == arrays.adapter(data).name
        and a.device(buf) == a.device(data)
        and (a.contiguous(buf) and a.contiguous(data) or _same_layout(buf, data))
        and a.writeable(buf)
        and a.aligned(buf)
        and a.unsupported(buf) is None
    )


def _same_layout(a, b) -> bool:
    layout = arrays.layout(a)
    return layout is not None and layout == arrays.layout(b)


def _state_array(where_: str, what: str, buf, data, dt: DType) -> tuple[object, bool]:
    """`buf` when it fits parameter array `data` as state of dtype `dt`, else a converted copy
    (and whether it is one). A buffer of another shape (another parameter's, another model's)
    or of no known array type is refused: a kernel must never get its pointer."""
    if _fits(buf, data, dt):
        return buf, False
    if not arrays.is_array(buf):
        raise TypeError(f"{where_}: {what} is a {arrays.type_name(buf)}, not an array")
    if tuple(buf.shape) != tuple(data.shape):
        raise ValueError(
            f"{where_}: {what} has shape {tuple(buf.shape)}, the parameter "
            f"{tuple(data.shape)} (state of another parameter or model?); load a matching "
            "state_dict, or delete this parameter's entry in optimizer.state to start it afresh"
        )
    problem = arrays.adapter(buf).unsupported(buf)
    if problem is not None or arrays.dtype(buf) is None:
        raise ValueError(f"{where_}: {what}: {problem or f'dtype {buf.dtype} is not a float'}")
    converted = arrays.zeros_as(data, dt)
    arrays.assign(converted, buf)
    return converted, True


def _join_spans(parts: list[list[tuple]]) -> Spans:
    """Spans from draft tuples (start, end, written, where, slot), in order."""
    rows = [s for part in parts for s in part]
    table = np.array([s[:3] for s in rows], dtype=np.uint64).reshape(len(rows), 3)
    return Spans(table, [s[3:] for s in rows])


def check_disjoint(parts: list[Spans]) -> None:
    """Raise ValueError naming two memory ranges that overlap where at least one is written.

    Sorting every range by its start finds a clash in O(n log n) without comparing every pair;
    empty ranges touch nothing.
    """
    parts = [p for p in parts if len(p.table)]
    if not parts:
        return
    table = np.concatenate([p.table for p in parts])
    keep = np.flatnonzero(table[:, 1] > table[:, 0])
    if len(keep) < 2:
        return
    order = keep[np.argsort(table[keep, 0], kind="stable")]
    start, end, written = table[order, 0], table[order, 1], table[order, 2].astype(bool)
    zero = np.zeros(1, np.uint64)
    ended = np.concatenate((zero, np.maximum.accumulate(end)[:-1]))
    ended_written = np.concatenate((zero, np.maximum.accumulate(end * written)[:-1]))
    clash = np.where(written, ended > start, ended_written > start)
    if not clash.any():
        return
    i = int(np.argmax(clash))
    j = next(j for j in range(i) if end[j] > start[i] and (written[i] or written[j]))
    labels = [label for p in parts for label in p.labels]

    def name(row: int) -> str:
        where_, slot = labels[row]
        what = _SLOT_NAMES.get(slot, f"state {slot!r}")
        return where_ if slot == "param" else f"{where_} ({what})"

    raise ValueError(
        f"{name(order[j])} and {name(order[i])} overlap in memory; every array a step writes must "
        "be disjoint from every other array of the step (all groups): pass separate arrays"
    )


def _moves_of(plan: _Plan) -> _Moves | None:
    """Where the gradients of a freshly built step plan are bound, when its launches' tables
    are host memory (`Launch.table_cells`); None otherwise."""
    rows = sorted(plan.rows.values(), key=lambda r: r[:2])  # (batch, row, index, data)
    index = np.array([r[2] for r in rows], np.int64)
    span_row, nbytes, itemsize = [], [], []
    for b, j, _, data in rows:
        rule = plan.batches[b].rule
        k = [slot.name for slot in rule.slots].index("grad")
        span_row.append(plan.spans_offset[b] + j * len(rule.slots) + k)
        itemsize.append(rule.slots[k].dtype.itemsize)
        nbytes.append(arrays.numel(data) * itemsize[-1])
    nbytes_ = np.array(nbytes, np.uint64)
    start, cells = 0, []
    for batch in plan.batches:
        n = len(batch.params)
        cells.append(batch.launch.table_cells("grad", np.arange(n), nbytes_[start:start + n]))
        start += n
    if any(c is None for c in cells):
        return None
    cells_ = np.concatenate(cells) if cells else np.zeros(0, np.uint64)
    itemsize_ = np.array(itemsize, np.uint64)
    return _Moves(index, np.array(span_row, np.int64), nbytes_, itemsize_, cells_,
                  Program(index, cells_, nbytes_, itemsize_))


def _spans_with(plan: _Plan, new: tuple[np.ndarray, np.ndarray]) -> Spans:
    """The plan's spans with its bound gradients at `new` (addresses, ends): a copy."""
    table = plan.spans.table.copy()
    rows = plan.moves.span_row
    table[rows, 0], table[rows, 1] = new
    return Spans(table, plan.spans.labels)


def _changed_params(plan: _Plan, addresses: tuple | None, params: list) -> list | None:
    """The parameters whose `.grad` or `.data` may have changed since `plan` was built or
    refreshed, or None when a rebuild is simpler (a tensor moved, too long ago to tell)."""
    changed = _parameter.changed_since(plan.generation)
    if changed is None:
        return None
    if addresses is not None:
        (ptrs, metas), (old_ptrs, old_metas) = addresses, plan.addresses
        if len(ptrs) != len(old_ptrs):
            return None
        for i, (now, then) in enumerate(zip(metas, old_metas)):
            if now != then or ptrs[i] != old_ptrs[i]:
                if now[:4] != then[:4]:  # the tensor itself moved or changed its layout
                    return None
                changed.append(params[i])
    return changed


def check_number(name: str, value, *, minimum: float = 0.0, strict: bool = False,
                 maximum: float | None = None) -> None:
    """Raise ValueError naming `name` unless `value` is a finite real in the allowed range."""
    if value is required:
        raise ValueError(f"parameter '{name}' is required (none given)")
    kind = type(value)  # float and int first: this runs for every hyperparameter at every step
    if kind is not float and kind is not int and (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"Invalid {name}: {value!r} (must be a real number)")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int or Fraction beyond float range
        raise ValueError(f"Invalid {name}: a number too large for a float") from None
    if not finite:
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    low_ok = value > minimum if strict else value >= minimum
    if not low_ok or (maximum is not None and value > maximum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        if maximum is not None:
            bound = f"in [{minimum:g}, {maximum:g}]"
        raise ValueError(f"Invalid {name}: {value} (must be {bound})")


def check_scale_and_clip(group: dict) -> None:
    """Dragon's gradient `scale` (> 0) and per-tensor `clip_norm` (>= 0), which every built-in
    optimizer takes."""
    check_number("scale", group["scale"], strict=True)
    check_number("clip_norm", group["clip_norm"])


# -- rules the base class runs itself -----------------------------------------------------------
_RULES: dict[tuple, UpdateRule] = {}


def _accumulate_rule(compute: DType, grad_dtype: DType) -> UpdateRule:
    key = ("accumulate", compute, grad_dtype)
    if key not in _RULES:
        g = tensor("grad", grad_dtype).cast(compute)
        acc = tensor("accum", compute)
        _RULES[key] = UpdateRule(
            f"accumulate_{grad_dtype}_to_{compute}",
            [Slot("grad", grad_dtype), Slot("accum", compute, written=True)],
            {"accum": where(per_tensor("first", DType.BOOL), g, acc + g)},
        )
    return _RULES[key]


def _zero_rule(grad_dtype: DType) -> UpdateRule:
    key = ("zero", grad_dtype)
    if key not in _RULES:
        from ..ir import const

        _RULES[key] = UpdateRule(
            f"zero_{grad_dtype}",
            [Slot("grad", grad_dtype, written=True)],
            {"grad": const(0.0, grad_dtype)},
        )
    return _RULES[key]
