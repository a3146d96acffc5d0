"""Optimizer: parameter groups, state, gradient accumulation, and the launch of compiled rules.

A subclass says *what* the update is; this class does the rest:

    class MyOpt(Optimizer):
        def check_group(self, group): ...          # raise ValueError on a bad hyperparameter
        def structure(self, group): ...            # hashable: which terms are on
        def rule(self, structure, param_dtype, grad_dtype) -> UpdateRule: ...
        def scalars(self, group) -> dict: ...      # numeric hyperparameters, by rule scalar name

Slots of the rule other than "param" and "grad" are state buffers: created zero-filled in the
compute dtype on a tensor's first step (the rule's per-tensor value `first` is then true) and
stored in `self.state[param][slot]`.

`step()` works in two phases. First every group is checked (hyperparameters, and every tensor when
its launch table must be rebuilt) and nothing is written; then each group's kernels run, one launch
per (param dtype, grad dtype) combination. Launch tables are cached and rebuilt only when a
`.data` or `.grad` is reassigned, state is created or loaded, or the structure changes.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .. import parameter as _parameter
from ..ir import DType, Slot, UpdateRule, per_tensor, tensor, where
from ..parameter import Parameter
from ..runtime import arrays
from ..runtime.backend import Backend, Launch
from ..runtime.select import select_backend


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


@dataclass
class _Plan:
    """The cached launches of one group, valid while `token` is unchanged."""

    kind: str
    token: tuple
    batches: list[_Batch] = field(default_factory=list)
    params: frozenset = frozenset()


class Optimizer:
    """Base class of every stepjit optimizer (see the module docstring for the subclass API)."""

    def __init__(self, params, defaults: dict, *, backend: str | None = None) -> None:
        self._setup(defaults, [], {}, backend)
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

    def _setup(self, defaults: dict, param_groups: list, state: dict, backend) -> None:
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = param_groups
        self.state: dict = state
        self._accum: dict = {}  # accumulation buffers, kept across steps
        self._pending: frozenset = frozenset()  # params with accumulated gradients
        self._state_gen = 0  # bumped when state buffers are created or loaded
        self._plans: dict[tuple, _Plan] = {}
        self._rules: dict[tuple, UpdateRule] = {}
        self._requested_backend = backend
        self._has_torch = False

    @classmethod
    def over(cls, param_groups: list[dict], state: dict, *, backend: str | None = None):
        """An optimizer that works on existing `param_groups` and `state` containers, shared,
        not copied (`stepjit.torch` runs its kernels over a torch.optim.Optimizer's own)."""
        self = cls.__new__(cls)
        self._setup({}, param_groups, state, backend)
        for index, group in enumerate(param_groups):
            for i, p in enumerate(group["params"]):
                _check_param(f"param group {index}, parameter {i}", p)
            self._check_group(index, group)
        self._has_torch = any(arrays.is_torch(p) for g in param_groups for p in g["params"])
        self._backend = self._select_backend()
        return self

    def share(self, param_groups: list[dict], state: dict) -> None:
        """Point at new containers (after torch's load_state_dict replaced them)."""
        if param_groups is not self.param_groups or state is not self.state:
            self.param_groups, self.state = param_groups, state
            self._state_gen += 1

    # -- the subclass interface ------------------------------------------------------------------
    counts_steps: bool = False
    """Keep a per-parameter step count in `state[param]["step"]` (Adam's bias corrections)."""

    def tensor_values(self, group: dict, step: np.ndarray) -> dict[str, np.ndarray]:
        """Per-tensor values for this step, computed on the host in float64 and vectorized over
        the tensors of one launch; `step` holds each tensor's step count, this step included."""
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
        return self._backend.name

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
        seen = {p for g in self.param_groups for p in g["params"]}
        if len(set(params)) != len(params) or seen.intersection(params):
            raise ValueError(f"param group {index}: a parameter appears in more than one group")
        for name, default in self.defaults.items():
            if default is required and name not in group:
                raise ValueError(
                    f"param group {index}: parameter '{name}' is required (none given)"
                )
            group.setdefault(name, default)
        group.setdefault("lr_mult", 1.0)
        group.setdefault("decay_mult", 1.0)
        group["params"] = params
        self._check_group(index, group)
        if hasattr(self, "_backend"):
            # the backend is chosen once for all params: a new group must live on the same device
            devices = {arrays.device(_array(p)) for p in params} | self._devices()
            select_backend(self._requested_backend, devices)
        self.param_groups.append(group)
        self._has_torch = self._has_torch or any(map(arrays.is_torch, params))
        self._state_gen += 1

    def step(self) -> None:
        """Update every parameter that has a gradient (or a pending accumulation)."""
        pending = self._pending
        plans = self._plans_for("step", pending)
        for group, plan in zip(self.param_groups, plans):
            self._run(plan, self.scalars(group), group)
        if pending:
            self._pending = frozenset()
            for plan in self._plans.values():  # the next accumulation copies instead of adding
                if plan.kind == "accumulate":
                    for b in plan.batches:
                        b.launch.per_tensor[:, b.first_column] = 1.0

    def accumulate_grad(self) -> None:
        """Add every gradient into its parameter's accumulation buffer (copy on the first call)."""
        pending = self._pending
        plans = self._plans_for("accumulate", pending)
        for plan in plans:
            self._run(plan, {})
        added = pending.union(*(plan.params for plan in plans))
        if added != pending:
            self._pending = added

    def zero_grad(self, reset: bool = False) -> None:
        """Zero every `.grad` in place, or set it to None (`reset=True`) to release its memory.

        A pending accumulation is never touched.
        """
        if reset:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        for plan in self._plans_for("zero", frozenset()):
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
        groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(saved_state, dict):
            raise ValueError("state_dict needs 'state' (dict) and 'param_groups' (list)")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} param groups, the optimizer {len(self.param_groups)}"
            )
        by_index: dict[int, Parameter] = {}
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"param group {gi}: state_dict has {len(saved['params'])} parameters, "
                    f"the optimizer {len(mine['params'])}"
                )
            by_index.update(zip(saved["params"], mine["params"]))
        new_state: dict[Parameter, dict] = {}
        for idx, buffers in saved_state.items():
            p = by_index.get(idx)
            if p is None:
                raise ValueError(f"state_dict has state for unknown parameter index {idx!r}")
            new_state[p] = {}
            data = _array(p)
            for name, buf in buffers.items():
                if name == "step":
                    new_state[p][name] = np.array(float(buf))
                    continue
                buf = np.asarray(buf) if not arrays.is_array(buf) else buf
                if tuple(buf.shape) != tuple(data.shape):
                    raise ValueError(
                        f"state_dict: {name} of parameter {idx} has shape {tuple(buf.shape)}, "
                        f"the parameter {tuple(data.shape)}"
                    )
                new_buf = arrays.zeros(data, tuple(data.shape), arrays.dtype(data).compute)
                arrays.assign(new_buf, buf)
                new_state[p][name] = new_buf
        new_groups = []
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            group = {**mine, **{k: v for k, v in saved.items() if k != "params"}}
            group["params"] = mine["params"]
            self._check_group(gi, group)
            new_groups.append(group)
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

    def _select_backend(self) -> Backend:
        devices = self._devices()
        self._device = next(iter(devices), "cpu")
        return select_backend(self._requested_backend, devices)

    def _check_group(self, index: int, group: dict) -> None:
        try:
            # the per-group multipliers are the base class's: every optimizer has them
            check_number("lr_mult", group["lr_mult"])
            check_number("decay_mult", group["decay_mult"])
            self.check_group(group)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"param group {index}: {exc}") from None

    def _plans_for(self, kind: str, pending: frozenset) -> list[_Plan]:
        """The launches for `kind` ('step', 'accumulate', 'zero') of every group.

        Every group is checked before any state is created, so a failure changes nothing.
        """
        ready: list[_Plan | None] = []
        todo = []
        for index, group in enumerate(self.param_groups):
            if kind == "step":
                self._check_group(index, group)
            structure = self.structure(group) if kind == "step" else None
            token = (
                _parameter.generation(),
                self._state_gen,
                structure,
                pending if kind == "step" else None,
                id(group["params"]),
                len(group["params"]),
                # torch sets .grad (and may move .data) behind our back: compare them
                _torch_fingerprint(group["params"]) if self._has_torch else None,
            )
            plan = self._plans.get((kind, index))
            if plan is not None and plan.token == token:
                ready.append(plan)
            else:
                ready.append(None)
                todo.append((index, token, structure, self._collect(kind, index, group, pending)))
        for index, token, structure, work in todo:
            plan = _Plan(kind, token)
            for rule, params, tensors, first in self._bind_inputs(kind, structure, work, pending):
                kernel = self._backend.compile(rule)
                pt = np.zeros((len(params), len(rule.per_tensor)), np.float64)
                names = rule.per_tensor_names
                col = names.index("first") if "first" in names else None
                if col is not None:
                    pt[:, col] = first
                launch = self._backend.bind(kernel, tensors, pt)
                if self._has_torch:  # the token's address check stands in for the references
                    launch.forget("grad")
                batch = _Batch(rule, params, launch, col)
                if kind == "step" and self.counts_steps:
                    batch.steps = self._step_counts(params)
                plan.batches.append(batch)
            plan.params = frozenset(p for b in plan.batches for p in b.params)
            self._plans[(kind, index)] = ready[index] = plan
        return ready

    def _collect(self, kind, index, group, pending):
        """[(param, gradient array)] per dtype combination, every tensor checked."""
        by_dtypes: dict[tuple[DType, DType], list] = {}
        spans = []
        for i, p in enumerate(group["params"]):
            where_ = f"param group {index}, parameter {i}"
            grad = self._accum[p] if (kind == "step" and p in pending) else p.grad
            if grad is None:
                continue
            data = _array(p)
            if arrays.device(data) != self._device:
                raise ValueError(f"{where_}: parameter is on {arrays.device(data)}, but the "
                                 f"optimizer runs on {self._device} (backend {self.backend!r})")
            if kind == "zero":
                pd = gd = _check_gradient(where_, grad)
                span = arrays.byte_span(data)
            else:
                pd, gd, span = _check_tensor_pair(where_, data, grad)
            by_dtypes.setdefault((pd, gd), []).append((p, grad))
            spans.append((*span, where_))
        spans.sort()
        spans = [s for s in spans if s[1] > s[0]]
        for (_, a1, wa), (b0, _, wb) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ValueError(f"{wa} and {wb} overlap in memory; each must own its data")
        return by_dtypes

    def _bind_inputs(self, kind, structure, work, pending):
        """Create missing state, then yield (rule, params, tensors, first flags) per batch."""
        for (pd, gd), items in work.items():
            params = [p for p, _ in items]
            if kind == "zero":
                yield _zero_rule(gd), params, [(g,) for _, g in items], 0.0
                continue
            if kind == "accumulate":
                rule = _accumulate_rule(pd.compute, gd)
                first = np.array([p not in pending for p in params], np.float64)
                for p in params:
                    if p not in self._accum:
                        data = _array(p)
                        self._accum[p] = arrays.zeros(data, tuple(data.shape), pd.compute)
                yield rule, params, [(g, self._accum[p]) for p, g in items], first
                continue
            key = (structure, pd, gd)
            rule = self._rules.get(key)
            if rule is None:  # trace once per structure: rebuilds of the table reuse it
                rule = self._rules[key] = self.rule(structure, pd, gd)
            state_slots = [s.name for s in rule.slots if s.name not in ("param", "grad")]
            first = np.zeros(len(params))
            for j, p in enumerate(params):
                if not state_slots:
                    break
                st = self.state.setdefault(p, {})
                data = _array(p)
                for name in state_slots:
                    want = rule.slot(name).dtype
                    buf = st.get(name)
                    if buf is None:
                        st[name] = arrays.zeros(data, tuple(data.shape), want)
                        first[j] = 1.0
                    elif arrays.dtype(buf) is not want or arrays.device(buf) != arrays.device(data):
                        # a loaded buffer in another dtype (torch stores half state as half)
                        st[name] = arrays.zeros(data, tuple(data.shape), want)
                        arrays.assign(st[name], buf)
            tensors = []
            for p, g in items:
                by_slot = {"param": _array(p), "grad": g, **self.state.get(p, {})}
                tensors.append(tuple(by_slot[s.name] for s in rule.slots))
            yield rule, params, tensors, first

    def _step_counts(self, params: list) -> np.ndarray:
        """One array of step counts for a batch; each state["step"] becomes a 0-d view into it,
        so counting a step is one vectorized `+= 1` whatever the number of tensors."""
        steps = np.array([float(self.state.get(p, {}).get("step", 0)) for p in params])
        for j, p in enumerate(params):
            self.state.setdefault(p, {})["step"] = steps[j : j + 1].reshape(())
        return steps

    def _run(self, plan: _Plan, scalars: dict[str, float], group: dict | None = None) -> None:
        for b in plan.batches:
            if b.steps is not None:
                b.steps += 1
                pt, names = b.launch.per_tensor, b.rule.per_tensor_names
                for name, values in self.tensor_values(group, b.steps).items():
                    if name in names:
                        pt[:, names.index(name)] = values
            b.launch(tuple(scalars[n] for n in b.rule.scalar_names))
            if b.first_column is not None:
                # the first step of these tensors is done: later launches reuse the table
                b.launch.per_tensor[:, b.first_column] = 0.0


def _is_tensor_like(x: object) -> bool:
    return isinstance(x, Parameter) or arrays.is_array(x) or hasattr(x, "__dlpack__")


def _is_param(x: object) -> bool:
    return isinstance(x, Parameter) or arrays.is_torch(x)


def _array(p):
    """The array holding a parameter's values: a Parameter's `.data`, or the torch tensor itself."""
    return p.data if isinstance(p, Parameter) else p


def _check_param(where_: str, p) -> None:
    if isinstance(p, Parameter):
        return
    if arrays.is_torch(p):
        if not p.is_leaf:
            raise ValueError(f"{where_}: the torch tensor is not a leaf (it is computed from "
                             "other tensors); optimize the leaf tensors it comes from")
        if not p.requires_grad:
            raise ValueError(f"{where_}: the torch tensor does not require grad")
        return
    raise TypeError(f"{where_}: expected stepjit.Parameter or a torch tensor, "
                    f"got {arrays.type_name(p)}")


def _torch_fingerprint(params) -> tuple:
    """What torch may change without telling us: where each gradient and parameter lives.

    Launch tables of torch groups do not keep gradients alive (`Launch.forget`), so that
    `zero_grad(set_to_none=True)` frees them and backward can reuse the memory. A gradient at the
    same address is then as good as the old one: torch keeps a gradient's shape, dtype and device
    equal to its parameter's.
    """
    return tuple([(0 if p.grad is None else p.grad.data_ptr(), p.data_ptr()) for p in params])


def _check_gradient(where_: str, grad) -> DType:
    """Check a gradient that zero_grad() writes into."""
    if arrays.dtype(grad) is None:
        raise TypeError(f"{where_}: gradient dtype {grad.dtype} is not a floating type")
    aligned = arrays.data_ptr(grad) % arrays.itemsize(grad) == 0
    if not (arrays.is_writeable(grad) and arrays.is_contiguous(grad) and aligned):
        raise ValueError(f"{where_}: gradient must be writeable, contiguous and aligned to zero it")
    return arrays.dtype(grad)


def _check_tensor_pair(where_: str, data, grad) -> tuple[DType, DType, tuple[int, int]]:
    """Check a parameter and its gradient for a step: their dtypes and the parameter's bytes."""
    da, ga = arrays.adapter(data), arrays.adapter(grad)
    pd, gd = da.dtype(data), ga.dtype(grad)
    for what, arr, dt in (("parameter", data, pd), ("gradient", grad, gd)):
        if dt is None:
            raise TypeError(f"{where_}: {what} dtype {arr.dtype} is not a floating type "
                            "(float16, bfloat16, float32 or float64)")
    if tuple(grad.shape) != tuple(data.shape):
        raise ValueError(f"{where_}: gradient shape {tuple(grad.shape)} differs from the "
                         f"parameter's {tuple(data.shape)}")
    if ga.device(grad) != da.device(data):
        raise ValueError(f"{where_}: gradient is on {ga.device(grad)}, the parameter on "
                         f"{da.device(data)}")
    if not da.writeable(data):
        raise ValueError(f"{where_}: parameter is read-only")
    spans = []
    for what, arr, a in (("parameter", data, da), ("gradient", grad, ga)):
        if not a.contiguous(arr):
            raise ValueError(f"{where_}: {what} is not C-contiguous; pass a contiguous array "
                             "(numpy.ascontiguousarray)")
        start, size = a.data_ptr(arr), a.itemsize(arr)
        if start % size:
            raise ValueError(f"{where_}: {what} is not aligned to its element size; "
                             "copy it (numpy.require(a, requirements='A'))")
        spans.append((start, start + a.numel(arr) * size))
    if arrays.overlap(*spans):
        raise ValueError(f"{where_}: parameter and gradient share memory")
    return pd, gd, spans[0]


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
    if not math.isfinite(value):
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
