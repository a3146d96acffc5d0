"""torch interop: every stepjit optimizer as a `torch.optim.Optimizer`.

    model = torch.nn.Linear(10, 1)
    opt = stepjit.torch.AdamW(model.parameters(), lr=1e-3)        # torch.optim.AdamW's arguments
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30)    # no recompilation

`SGD`, `Adam`, `AdamW`, `RMSprop` and `Adagrad` take torch's arguments with torch's defaults and
keep torch's state keys, so scripts, schedulers, `torch.amp.GradScaler`, hooks and checkpoints
(both ways) work unchanged; `LARS` and any user optimizer (`optimizer_for(Lion)`) get the same
face. Every class also takes Dragon's `scale` and `clip_norm`, and:
    process_group: a `torch.distributed` process group; gradients are averaged over it, in
        buckets that start as backward produces them (`None`: no communication).
    bucket_cap_mb: the largest bucket, in MiB of gradients (see `stepjit.distributed`).
    shard_state: with a process group, keep 1/world of the optimizer state per rank: gradients
        reduce-scattered, each rank steps its shard, parameters all-gathered (ZeRO stage 2;
        `consolidate_state_dict` before `state_dict`; docs/distributed.md).
    backend: "llvm", "cuda" or "reference"; default: where the tensors live.

Parameters are updated in place through their data pointers (CPU tensors with the LLVM backend,
CUDA tensors with the CUDA backend), whatever their dense layout (channels_last too); nothing is
copied. stepjit's step is always one fused kernel per group and dtype, so `foreach` and `fused`
are accepted and change nothing; `maximize`, a tensor `lr`, frozen parameters and parameters
made on the meta device (materialized before the first step) work as in torch. What the kernels
cannot do runs torch's own implementation of the update over the same state (`differentiable=
True`, parameters that are not dense); complex parameters and sparse gradients are refused.

Importing this module imports torch; `import stepjit` alone never does.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch

from . import distributed as _distributed
from . import optim as _optim
from .ir import scales_of
from .optim.compact import check_pair
from .optim.optimizer import _snapshot
from .optim.optimizer import required as _required
from .parameter import Parameter
from .runtime import arrays

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "LARS", "Optimizer", "optimizer_for"]

_TORCH_FLAGS = {"foreach": None, "fused": None, "maximize": False, "capturable": False,
                "differentiable": False}
"""torch.optim's flags that every face takes, with torch's defaults."""

_DRAGON_NEUTRAL = {"scale": 1, "clip_norm": 0, "lr_mult": 1, "decay_mult": 1}
"""stepjit's hyperparameters that torch's optimizers lack, at the values that change nothing."""

_FACE_ARGUMENTS = {"process_group": None, "bucket_cap_mb": 25.0, "shard_state": False,
                   "backend": None,
                   "state_dtype": None, "master_weights": False, "stochastic_rounding": False,
                   "rounding_seed": 0}


class Optimizer(torch.optim.Optimizer):
    """The base of the torch faces: torch's param groups, state and hooks; stepjit's kernels.

    A face is made by `optimizer_for(engine)`; `engine` is the stepjit optimizer class whose
    rule runs, `torch_class` torch's class of the same name when there is one (its arguments,
    defaults and checks are the face's).
    """

    engine: type[_optim.Optimizer]
    torch_class: type | None = None
    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands over grad_scale, found_inf

    def __init__(self, params, *args, **kwargs) -> None:
        arguments = self.__signature__.bind(params, *args, **kwargs)
        arguments.apply_defaults()
        values = dict(arguments.arguments)
        params = values.pop("params")
        face = {name: values.pop(name) for name in _FACE_ARGUMENTS}
        if isinstance(params, Iterable) and not isinstance(params, torch.Tensor):
            params = list(params)  # read once: torch's class and this one both take it
        if self.torch_class is not None:  # torch's own checks of every argument, torch's errors
            names = inspect.signature(self.torch_class.__init__).parameters
            defaults = dict(self.torch_class(
                params, **{k: v for k, v in values.items() if k in names}).defaults)
        else:
            defaults = {name: values[name] for name in _TORCH_FLAGS}
        engine_defaults = _engine_defaults(self.engine, values)
        if values["differentiable"] and self.torch_class is None:
            raise ValueError(f"{type(self).__name__}: differentiable=True is not supported "
                             "(stepjit's kernels do not record autograd graphs, and torch has "
                             "no implementation of this update to run instead)")
        defaults = {**engine_defaults, **defaults, "lr_mult": 1.0, "decay_mult": 1.0}
        super().__init__(params, defaults)
        self.process_group = face["process_group"]
        self.bucket_cap_bytes = int(face["bucket_cap_mb"] * 2**20)
        self._requested_backend = face["backend"]
        self._capturable = bool(values["capturable"])
        self._storage_options = _optim.optimizer.Storage(
            face["state_dtype"], face["master_weights"], face["stochastic_rounding"],
            face["rounding_seed"])
        self._engine = self._new_engine()
        self._not_dense = self._find_not_dense()
        self._comm = self._shards = self._consolidated = None
        if not isinstance(face["shard_state"], bool):
            raise TypeError(f"shard_state must be a bool, got {face['shard_state']!r}")
        if face["shard_state"] and self.process_group is None:
            raise ValueError(f"{type(self).__name__}: shard_state=True shards the state across "
                             "the ranks of a process group: pass process_group=")
        if self.process_group is not None:
            self._distribute(face["shard_state"])

    def _distribute(self, shard: bool) -> None:
        """Check that every rank holds the same parameters, then hook the gradient buckets (and
        shard the state): see `stepjit.distributed`."""
        params = [p for g in self.param_groups for p in g["params"]]
        _distributed.check_same_parameters(params, self.process_group, type(self).__name__)
        if self._comm is not None:
            self._comm.remove_hooks()
        whole = shard and _distributed.reads_norms(self._engine,
                                                   _with_numbers(self.param_groups))
        self._comm = _distributed.Communicator(params, self.process_group,
                                               self.bucket_cap_bytes, shard, whole)
        if shard:
            if self._not_dense:
                raise ValueError(f"{type(self).__name__}: shard_state=True needs dense "
                                 f"parameters ({self._not_dense})")
            self._shards = _distributed.Shards(
                self._comm, _with_numbers(self.param_groups), self.engine,
                backend=self._requested_backend, storage=self._storage_options)

    def _find_not_dense(self) -> str | None:
        """Which parameter, if any, has gaps or overlaps in memory (a view such as x[..., 0]):
        stepjit's kernels walk dense memory, so this optimizer's steps are then torch's."""
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if not (p.is_contiguous() or arrays.is_dense(p)):
                    if self.torch_class is None:
                        raise ValueError(
                            f"param group {gi}, parameter {i} has gaps or overlaps in memory "
                            f"(strides {p.stride()}); pass a dense tensor (.contiguous())")
                    warnings.warn(
                        f"{type(self).__name__}: param group {gi}, parameter {i} has gaps or "
                        f"overlaps in memory (strides {p.stride()}): stepjit's kernels update "
                        f"dense tensors, so every step runs torch.optim.{self.torch_class.__name__}"
                        "'s implementation; make the parameter dense for stepjit's kernels",
                        RuntimeWarning, stacklevel=3)
                    return f"param group {gi}, parameter {i} is not dense"
        return None

    def _new_engine(self) -> _optim.Optimizer:
        return self.engine.over(_with_numbers(self.param_groups), self.state,
                                backend=self._requested_backend, step_count=torch.from_numpy,
                                capturable=self.__dict__.get("_capturable", False),
                                storage=self.__dict__.get("_storage_options"))

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("_shards") is not None:
            raise ValueError(f"{type(self).__name__}: a sharded optimizer partitions its "
                             "parameters once: give every group when it is made")
        super().add_param_group(param_group)  # torch's checks and defaults
        engine = self.__dict__.get("_engine")
        if engine is not None:  # a group added later: checked before it is kept
            try:
                engine.adopt_group(len(self.param_groups) - 1, _numbers(self.param_groups[-1]))
                self._not_dense = self._find_not_dense()
            except (TypeError, ValueError):
                self.param_groups.pop()
                raise
            if self.__dict__.get("_comm") is not None:  # new buckets, on every rank
                self._distribute(False)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "process_group": self.process_group,
                "bucket_cap_bytes": self.bucket_cap_bytes,
                "_requested_backend": self._requested_backend,
                "_capturable": self.__dict__.get("_capturable", False),
                "_storage_options": self.__dict__.get("_storage_options")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim checkpoint lacks Dragon's keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if "_engine" not in self.__dict__:  # a copy or an unpickled optimizer: kernels anew
            self.__dict__.setdefault("process_group", None)
            self.__dict__.setdefault("bucket_cap_bytes", int(_FACE_ARGUMENTS["bucket_cap_mb"]
                                                             * 2**20))
            self.__dict__.setdefault("_requested_backend", None)
            self._comm = self._shards = self._consolidated = None  # hooked at the first step
            self._engine = self._new_engine()
            self._not_dense = self._find_not_dense()

    def __reduce_ex__(self, protocol):
        # faces of user optimizers are made at run time: pickle the engine class, not the face
        return (_unpickled, (self.engine, self.torch_class), self.__getstate__())

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's `load_state_dict`, keeping the saved dtype of state: torch casts every state
        tensor to its parameter's dtype, which would round the float32 state and master copies
        stepjit keeps for half parameters and turn 8-bit codes into numbers (stepjit converts
        what it must itself, at the next step). 8-bit state is checked first: codes whose
        scales do not match are refused before anything changes."""
        _check_compact(state_dict, [p for g in self.param_groups for p in g["params"]])
        super().load_state_dict(state_dict)
        self._restore_dtypes(state_dict)
        if self.__dict__.get("_shards") is not None:  # each rank keeps its pieces
            self._shards.load(self.state)
            self.state.clear()

    def _restore_dtypes(self, state_dict: dict) -> None:
        """Each state tensor torch cast to its parameter's dtype, as it was saved."""
        saved = state_dict["state"]
        ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                loaded = self.state.get(p, {}).get(key)
                if (isinstance(value, torch.Tensor) and isinstance(loaded, torch.Tensor)
                        and value.dtype != loaded.dtype):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)

    @property
    def backend(self) -> str:
        """The stepjit backend running the update: 'llvm', 'cuda' or 'reference'."""
        return self._engine.backend

    def step(self, closure: Callable[[], float] | None = None):
        """Average the gradients over `process_group` (if any), then update every parameter
        that has a gradient; with `torch.amp.GradScaler`, skip the update when its gradients
        overflowed and unscale them inside the kernels otherwise.

        Two things stepjit's kernels cannot do are left to torch's own implementation of the
        same update, over this optimizer's groups and state: a step that autograd records (a
        group with `differentiable=True`), and parameters that are not dense (a warning says
        so when the optimizer is made)."""
        if self._not_dense or any(g.get("differentiable") for g in self.param_groups):
            if self.process_group is None:
                return self._torch_step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.average_gradients()  # then torch's update of the means
            self._torch_step(None)
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()  # no autograd: kernels take raw addresses (average_gradients: no_grad)
        return loss

    def _torch_step(self, closure):
        """torch's step of `torch_class` over this optimizer's own groups, state and flags."""
        for gi, group in enumerate(self.param_groups):
            for name, neutral in _DRAGON_NEUTRAL.items():
                if group.get(name, neutral) != neutral:
                    raise ValueError(
                        f"param group {gi}: {name}={group[name]} is stepjit's own, which torch's "
                        f"implementation lacks, and this step must be torch's "
                        f"({self._not_dense or 'differentiable=True'})")
        storage = self.__dict__.get("_storage_options")
        if storage is not None and storage != _optim.optimizer.Storage(
                rounding_seed=storage.rounding_seed):
            raise ValueError(
                f"{type(self).__name__}: {storage} is how stepjit's kernels store state and "
                f"parameters, which torch's implementation cannot do, and this step must be "
                f"torch's ({self._not_dense or 'differentiable=True'})")
        twin = self.torch_class.__new__(self.torch_class)
        twin.__dict__ = self.__dict__  # one set of attributes: the state is this optimizer's
        step = self.torch_class.step
        if getattr(step, "hooked", False):  # this optimizer's own step already ran the hooks
            step = step.__wrapped__
        return step(twin, closure)

    def _step(self) -> None:
        if self.process_group is not None:
            self.average_gradients()  # on every rank, whether or not it steps
        found_inf = self.__dict__.get("found_inf")  # set by torch.amp.GradScaler, if any
        if found_inf is not None and float(found_inf) != 0:
            return
        grad_scale = self.__dict__.get("grad_scale")
        groups = self._numeric_groups()
        if self._shards is not None:
            self._shards.step(groups, 1.0 if grad_scale is None else float(grad_scale))
            return
        self._engine.share(groups, self.state)
        sources = ()
        if groups is not self.param_groups and self._live_lr():
            sources = [_live_lr(g) for g in self.param_groups]
        self._engine.step(grad_scale=1.0 if grad_scale is None else float(grad_scale),
                          lr_sources=sources)

    def _numeric_groups(self) -> list[dict]:
        """The groups as the kernels read them (`_with_numbers`), found with one comparison of
        each group with its copy from the last call while all their values are immutable."""
        groups, plain = self.param_groups, self.__dict__.get("_plain")
        if plain is not None and len(plain) == len(groups) and all(
                g["params"] is p["params"] and g == p for g, p in zip(groups, plain)):
            return groups
        found = _with_numbers(groups, live_lr=self._live_lr())
        snapshots = [_snapshot(g) for g in groups]
        self._plain = snapshots if found is groups and None not in snapshots else None
        return found

    def _live_lr(self) -> bool:
        """Whether a CUDA tensor lr is read on the device (capturable CUDA steps) rather than
        as a number."""
        return self.__dict__.get("_capturable", False) and self._engine.backend == "cuda"

    def accumulate_grad(self) -> None:
        """Dragon's gradient accumulation: see `stepjit.optim.Optimizer.accumulate_grad`."""
        if self.process_group is not None:
            raise ValueError(f"{type(self).__name__}: accumulate_grad() keeps gradients this "
                             "rank alone holds, which a process group would never average: "
                             "accumulate by running backward several times before step() "
                             "(the buckets then reduce the sum)")
        self._engine.share(self._numeric_groups(), self.state)
        self._engine.accumulate_grad()

    def average_gradients(self) -> None:
        """Reduce (mean) every gradient over `process_group`: wait for the buckets that backward
        started, and run the others (`stepjit.distributed.Communicator.finish`). Unsharded,
        each `.grad` then holds the mean and keeps its identity, dtype and layout; sharded,
        each rank holds the mean of its shard. `step()` calls this; every rank must."""
        if self._comm is None:
            self._distribute(self._shards is not None)
        self._comm.finish()

    # -- sharded state: checkpoints ----------------------------------------------------------
    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the sharded state onto rank `to` of the process group (every rank must call
        this), whose `state_dict()` then returns the ordinary, unsharded state dict, loadable
        by an unsharded stepjit optimizer or torch's. As torch's ZeroRedundancyOptimizer."""
        if self._shards is None:
            raise ValueError(f"{type(self).__name__}: consolidate_state_dict is for "
                             "shard_state=True; state_dict() alone has the whole state")
        full = self._shards.consolidate(to)
        self._consolidated = None
        if full is not None:
            saved, self.state = self.state, full
            try:
                self._consolidated = torch.optim.Optimizer.state_dict(self)
            finally:
                self.state = saved

    def state_dict(self) -> dict:
        """torch's state dict; for sharded state, the one `consolidate_state_dict` gathered
        onto this rank."""
        if self.__dict__.get("_shards") is None:
            return super().state_dict()
        if self._consolidated is None:
            raise RuntimeError(f"{type(self).__name__}: this rank holds a shard of the state: "
                               "call consolidate_state_dict(to=rank) on every rank, then "
                               "state_dict() on that rank")
        return self._consolidated

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (step counts aside)."""
        if self._shards is not None:
            return self._shards.state_bytes()
        return sum(v.numel() * v.element_size() for st in self.state.values()
                   for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor))


def optimizer_for(engine: type[_optim.Optimizer], torch_class: type | None = None) -> type:
    """The `torch.optim.Optimizer` class running stepjit optimizer `engine`'s rule (made once).

    Its arguments are `torch_class`'s, with its defaults and checks, when given (torch's class of
    the same update), else `engine`'s hyperparameters; then any hyperparameter of `engine` that
    torch's class lacks, torch's flags (`foreach`, `fused`, `maximize`, `capturable`,
    `differentiable`) and `process_group`, `bucket_cap_mb`, `backend`, keyword-only.

        class Lion(stepjit.optim.Optimizer): ...      # the README's
        LionT = stepjit.torch.optimizer_for(Lion)
        opt = LionT(model.parameters(), lr=1e-4)      # a torch.optim.Optimizer
    """
    if not (isinstance(engine, type) and issubclass(engine, _optim.Optimizer)):
        raise TypeError(f"optimizer_for needs a stepjit.optim.Optimizer subclass, got {engine!r}")
    return _face(engine, torch_class)


@functools.cache
def _face(engine: type[_optim.Optimizer], torch_class: type | None) -> type:
    name = engine.__name__
    face = type(name, (Optimizer,), {
        "engine": engine, "torch_class": torch_class, "__module__": __name__,
        "__qualname__": name, "__signature__": _signature(engine, torch_class),
        "__doc__": (f"`stepjit.optim.{name}` (see it for the math) as a torch.optim.Optimizer"
                    + (f" with the arguments of `torch.optim.{torch_class.__name__}`"
                       if torch_class is not None else "")
                    + ".\n\nSee `stepjit.torch` for what every face adds and accepts."),
    })
    return face


def _signature(engine: type, torch_class: type | None) -> inspect.Signature:
    """The face's signature: see `optimizer_for`."""
    hyper = _optim.registry.hyperparameters(engine)
    params = inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    found = [params]
    if torch_class is not None:
        for p in list(inspect.signature(torch_class.__init__).parameters.values())[2:]:
            if p.name not in hyper and p.name not in _TORCH_FLAGS and p.name != (
                    "decoupled_weight_decay"):
                raise TypeError(f"torch.optim.{torch_class.__name__} takes {p.name!r}, which "
                                f"stepjit's {engine.__name__} does not")
            found.append(p.replace(annotation=inspect.Parameter.empty))
    else:
        for name, default in hyper.items():
            found.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                           default=default))
    keyword = inspect.Parameter.KEYWORD_ONLY
    have = {p.name for p in found}
    extra = {**{n: d for n, d in hyper.items() if n not in have}, **_TORCH_FLAGS,
             **_FACE_ARGUMENTS}
    found += [inspect.Parameter(n, keyword, default=d) for n, d in extra.items() if n not in have]
    # a positional parameter that lost its default to one before it would be refused: the
    # engine's required values (LARS's lr) keep `required`, which the probe reports
    return inspect.Signature(found)


def _engine_defaults(engine: type, values: dict) -> dict:
    """Every hyperparameter of `engine` with the values given, checked as `engine` checks them
    (ValueError, TypeError) on a one-element probe; tensors count as their values."""
    hyper = _optim.registry.hyperparameters(engine)
    given = {k: v for k, v in _numbers(values).items() if k in hyper}
    for name, default in hyper.items():
        if given.get(name, default) is _required:  # torch: each group must then give it
            given[name] = 0.01
    probe = engine([Parameter(np.zeros(1, np.float32))], backend="reference", **given)
    found = {k: v for k, v in probe.defaults.items() if k not in values}
    found.update({k: v for k, v in values.items() if k in hyper})
    return {k: torch.optim.optimizer.required if v is _required else v for k, v in found.items()}


def _unpickled(engine: type, torch_class: type | None) -> Optimizer:
    cls = optimizer_for(engine, torch_class)
    return cls.__new__(cls)


def _check_compact(state_dict, params: list) -> None:
    """Raise ValueError for 8-bit state in `state_dict` whose codes and scales do not match
    each other and their parameter (torch checks the rest of the layout)."""
    try:
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved = state_dict["state"]
    except (TypeError, KeyError):
        return  # torch's load_state_dict names what is malformed
    for i, p in zip(ids, params):
        buffers = saved.get(i) if isinstance(saved, dict) else None
        for name, value in (buffers.items() if isinstance(buffers, dict) else ()):
            scales = buffers.get(scales_of(name))
            if scales is not None and name != "step":
                check_pair(f"state_dict: parameter {i}", name, value, scales, tuple(p.shape))


def _live_lr(group: dict) -> torch.Tensor | None:
    """A group's `lr` when it is a tensor on a CUDA device, which a capturable step reads on the
    device at every launch (so a captured graph follows a schedule that writes it in place)."""
    lr = group["lr"]
    return lr if isinstance(lr, torch.Tensor) and lr.is_cuda else None


def _numbers(values: dict, live_lr: bool = False) -> dict:
    """`values` with tensors (a tensor `lr`, tensor betas) replaced by Python floats; with
    `live_lr`, a CUDA `lr` (`_live_lr`) by 1.0, the factor the kernels multiply it by."""
    if live_lr and _live_lr(values) is not None:
        values = {**values, "lr": 1.0}

    def number(v):
        if isinstance(v, torch.Tensor):
            return v.item()
        if type(v) is tuple and any(isinstance(x, torch.Tensor) for x in v):
            return tuple(number(x) for x in v)
        return v
    return {k: (v if k == "params" else number(v)) for k, v in values.items()}


def _holds_tensor(group: dict) -> bool:
    for k, v in group.items():
        if k != "params" and (isinstance(v, torch.Tensor) or (
                type(v) is tuple and any(isinstance(x, torch.Tensor) for x in v))):
            return True
    return False


def _with_numbers(groups: list[dict], live_lr: bool = False) -> list[dict]:
    """The groups as the kernels read them: the same dicts, or copies (holding the same
    parameter lists) where a hyperparameter is a tensor (see `_numbers`)."""
    if not any(map(_holds_tensor, groups)):
        return groups
    return [_numbers(g, live_lr) if _holds_tensor(g) else g for g in groups]


SGD = optimizer_for(_optim.SGD, torch.optim.SGD)
Adam = optimizer_for(_optim.Adam, torch.optim.Adam)
AdamW = optimizer_for(_optim.AdamW, torch.optim.AdamW)
RMSprop = optimizer_for(_optim.RMSprop, torch.optim.RMSprop)
Adagrad = optimizer_for(_optim.Adagrad, torch.optim.Adagrad)
LARS = optimizer_for(_optim.LARS)
