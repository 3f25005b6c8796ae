"""The machinery every fastdit op shares: registration, autograd, and dispatch to backends.

An :class:`Op` is built from its reference (plain PyTorch, the spec) and a schema. It defines
two operators in the ``fastdit`` ``torch.library``, ``fastdit::<name>`` and
``fastdit::<name>_backward``, so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one
opaque node each way:

- their fake (meta) implementations run the reference on fake tensors for the forward, and
  give every differentiable input's gradient the input's shape for the backward;
- their Autograd-key kernels: the forward's saves the inputs (a ``torch.autograd.Function``)
  and its backward calls the backward op; the backward op has no derivative (backpropagating
  through it, after create_graph=True, raises). Forward-mode AD and torch.func's gradient
  transforms (``torch.func.jvp``, ``grad``, ``vjp``, ``jacrev``) run the reference instead of a
  kernel: the kernels have no JVP, and an autograd.Function cannot serve torch.func;
- both ops pick a backend at run time. The reference's backward is the vector-Jacobian product
  of the reference (``torch.func.vjp``), so every op is differentiable before any backward
  kernel exists; a kernel backend may bring its own backward.

Why not ``torch.library.custom_op``, which builds the same from one decorator: its Python
wrappers (Dynamo's disable guard, alias checks, argument default filling) cost more host time
than a fused kernel's whole launch. On the CI machine (2 cores), a ``gated_adaln`` call on a
kernel that does nothing took 68 us through ``custom_op`` and 45 us here (eager PyTorch's
unfused version: 47 us), forward and backward 328 us and 265 us (``bench/bench_overhead.py``).

Both ops take the requested backend (a name or ``"auto"``) as their last argument, so a
compiled graph keeps the caller's choice.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import backends as _backends
from ..backends import AUTO, BACKENDS, BackendError
from . import _autocast

# The library of every fastdit op: ``fastdit::<name>`` and ``fastdit::<name>_backward``.
_LIB = torch.library.Library("fastdit", "DEF")
# The op whose next implementation call (forward, or backward from autograd) got arguments
# already checked: by its public function, or saved by that call's forward. Other calls
# (torch.ops.fastdit.* called directly, compiled graphs) check each kernel's contract.
_CHECKED = threading.local()


class Kernel(NamedTuple):
    """One backend's implementation of one op.

    forward(*inputs) -> the op's output(s), same layout as the reference's;
    backward(grads, inputs) -> gradients of the differentiable inputs, in order (or None: that
    backend has no backward; ``auto`` then runs the reference's);
    supports(*inputs) -> "" when this kernel serves the call, else the reason it does not.
    """

    forward: Callable[..., Any]
    backward: Callable[..., Sequence[torch.Tensor]] | None = None
    supports: Callable[..., str] | None = None


_ARG = re.compile(r"^\s*(?P<type>[\w\[\]?]+)\s+(?P<name>\w+)\s*$")


class Op:
    """A fastdit op: reference, torch.library registration, backends and dispatch.

    family:          the op family (``adaln``, ``patchify``, ``downsampled_attention``)
    name:            the op's name; registered as ``fastdit::<name>``
    args:            the schema's arguments, e.g. ``"Tensor x, Tensor shift, float eps"``
    outputs:         how many tensors the op returns (1: a tensor; more: a tuple)
    reference:       the plain PyTorch reference, called with the arguments in order
    differentiable:  names of the tensor arguments that receive gradients
    contract:        the shapes and devices every kernel backend needs, as a reason string
                     ('' when met) from the op's arguments; the torch backend does not need it
    """

    def __init__(
        self,
        family: str,
        name: str,
        args: str,
        outputs: int,
        reference: Callable[..., Any],
        differentiable: Sequence[str],
        contract: Callable[..., str] | None = None,
    ):
        self.family = family
        self.contract = contract
        self.name = name
        self.reference = reference
        self.outputs = outputs
        self.arg_names, self.arg_types = [], []
        for item in args.split(","):
            m = _ARG.match(item)
            if m is None:
                raise ValueError(f"bad argument {item!r} in the schema of {name}")
            self.arg_names.append(m["name"])
            self.arg_types.append(m["type"])
        self.diff_index = [self.arg_names.index(n) for n in differentiable]
        self.kernels: dict[str, Kernel] = {"torch": Kernel(reference)}
        self.last_backend: str | None = None  # the backend that ran the last eager forward
        self.last_backward_backend: str | None = None
        self._output_shapes_seen: dict[Any, list[torch.Size]] = {}
        _backends.note_implemented(family, "torch", name)

        out = "Tensor" if outputs == 1 else "(" + ", ".join(["Tensor"] * outputs) + ")"
        grads = ", ".join(f"Tensor grad{i}" for i in range(outputs))
        # pt2_compliant: the ops keep to what torch.compile and torch.export need (opcheck tests
        # it), so they pass Dynamo's only_allow_pt2_compliant_ops.
        tags = (torch.Tag.pt2_compliant_tag,)
        _LIB.define(f"{name}({args}, str backend) -> {out}", tags=tags)
        _LIB.define(f"{name}_backward({grads}, {args}, str backend) -> Tensor[]", tags=tags)
        # One autograd.Function class per op, so grad_fn and profiles name the op.
        self._function = type(f"fastdit_{name}", (_Differentiable,), {})
        self._no_derivative = type(f"fastdit_{name}_backward", (_NoDerivative,), {})
        self._fwd = getattr(torch.ops.fastdit, name).default
        self._bwd = getattr(torch.ops.fastdit, f"{name}_backward").default
        for op, impl, fake in (
            (name, self._forward_impl, self._forward_fake),
            (f"{name}_backward", self._backward_impl, self._backward_fake),
        ):
            _LIB.impl(op, impl, "CompositeExplicitAutograd")
            torch.library.register_fake(f"fastdit::{op}", fake, lib=_LIB)
        _LIB.impl(name, self._autograd_kernel, "Autograd", with_keyset=True)
        _LIB.impl(f"{name}_backward", self._backward_autograd_kernel, "Autograd", with_keyset=True)

    # ------------------------------------------------------------------------------------------
    # Backends

    def register(
        self,
        backend: str,
        forward: Callable[..., Any],
        backward: Callable[..., Sequence[torch.Tensor]] | None = None,
        supports: Callable[..., str] | None = None,
    ) -> None:
        """Add a kernel backend (``cuda`` or ``triton``) for this op."""
        if backend not in BACKENDS or backend == "torch":
            raise ValueError(f"{self.name}: cannot register backend {backend!r}")
        self.kernels[backend] = Kernel(forward, backward, supports)
        _backends.note_implemented(self.family, backend, self.name)

    def _device(self, inputs: Sequence[Any]) -> torch.device | None:
        for x in inputs:
            if isinstance(x, torch.Tensor):
                return x.device
        return None

    def why_not(
        self, backend: str, inputs: Sequence[Any], backward: bool = False, checked: bool = False
    ) -> str:
        """'' when ``backend`` can serve this call (its backward too, if asked), else why not.
        ``checked``: the public function has checked the arguments (the contract is skipped)."""
        if backend == "torch":
            return ""
        kernel = self.kernels.get(backend)
        if kernel is None:
            return f"there is no {backend} kernel for {self.name}"
        if backward and kernel.backward is None:
            return f"the {backend} kernel of {self.name} has no backward yet"
        reason = _backends.unavailable_reason(backend, self._device(inputs))
        if not reason and self.contract is not None and not checked:
            reason = self.contract(*inputs)
        if not reason and kernel.supports is not None:
            reason = kernel.supports(*inputs)
        return reason

    def _select(
        self, backend: str, inputs: Sequence[Any], backward: bool, checked: bool = False
    ) -> str:
        if backend != AUTO:
            reason = self.why_not(backend, inputs, backward, checked)
            if reason:
                raise BackendError(
                    f"fastdit.{self.name}: backend {backend!r} cannot serve this call: {reason}"
                )
            return backend
        for name in BACKENDS:
            if not self.why_not(name, inputs, backward, checked):
                return name
        raise AssertionError("unreachable: the torch backend serves every call")

    # ------------------------------------------------------------------------------------------
    # The public entry point

    def __call__(self, *inputs: Any, backend: str | None = None) -> Any:
        choice = _backends.requested(self.family, backend)
        if backend is None and len(self.kernels) == 1:
            # An op with no kernel at all (the layer's parts U-DiT's unfused path calls:
            # polyphase_split, polyphase_merge, rope2d) runs its reference under FASTDIT_BACKEND,
            # which picks among kernels; an explicit backend= still has to be served.
            choice = "torch"
        if choice != AUTO and not torch.compiler.is_compiling():
            # Fail here, with the caller's frame in the traceback, rather than in the backward.
            needs_grad = torch.is_grad_enabled() and any(
                isinstance(inputs[i], torch.Tensor) and inputs[i].requires_grad
                for i in self.diff_index
            )
            self._select(choice, inputs, backward=needs_grad, checked=True)
        if torch.compiler.is_compiling():
            return self._fwd(*inputs, choice)
        _CHECKED.op = self
        try:
            return self._fwd(*inputs, choice)
        finally:
            _CHECKED.op = None

    # ------------------------------------------------------------------------------------------
    # The custom ops' implementations

    def _forward_impl(self, *args: Any) -> Any:
        *inputs, backend = args
        chosen = self._select(backend, inputs, backward=False, checked=self._take_checked())
        self.last_backend = chosen
        with _autocast.off(inputs):
            out = self.kernels[chosen].forward(*inputs)
        # The reference may return an input or a view of one; the kernels write new tensors.
        return _no_alias(out, inputs) if chosen == "torch" else out

    def _take_checked(self) -> bool:
        """Whether this implementation call got checked arguments (see _CHECKED); clears it,
        so that ops called inside the kernels check theirs."""
        checked = getattr(_CHECKED, "op", None) is self
        _CHECKED.op = None
        return checked

    def _forward_fake(self, *args: Any) -> Any:
        *inputs, _backend = args
        with _autocast.off(inputs):
            out = self.reference(*inputs)
        return out.clone() if isinstance(out, torch.Tensor) else tuple(o.clone() for o in out)

    def _backward_impl(self, *args: Any) -> list[torch.Tensor]:
        grads, inputs, backend = args[: self.outputs], args[self.outputs : -1], args[-1]
        checked = self._take_checked()
        if not checked:
            # Autograd's cotangents after a public function's forward are the outputs' shapes;
            # direct calls and compiled graphs get checked (about 5 us a call on the CI machine).
            reason = self._grads_reason(grads, inputs)
            if reason:
                raise ValueError(f"fastdit.{self.name}_backward: {reason}")
        chosen = self._select(backend, inputs, backward=True, checked=checked)
        self.last_backward_backend = chosen
        kernel = self.kernels[chosen]
        with _autocast.off(inputs):
            if kernel.backward is None:
                return self._reference_backward(grads, inputs)
            result = kernel.backward(grads, inputs)
        return [_like(g, inputs[i]) for i, g in zip(self.diff_index, result)]

    def _grads_reason(self, grads: Sequence[torch.Tensor], inputs: Sequence[Any]) -> str:
        """Why ``grads`` cannot be the cotangents of this call's outputs ('' if they can): each
        must have its output's shape and sit on the inputs' device (the kernels read them with
        the outputs' sizes)."""
        device = self._device(inputs)
        for i, (g, shape) in enumerate(zip(grads, self._output_shapes(inputs))):
            if g.shape != shape:
                return f"grad{i} has shape {tuple(g.shape)}, its output {tuple(shape)}"
            if device is not None and g.device != device:
                return f"grad{i} is on {g.device}, the inputs on {device}"
        return ""

    def _output_shapes(self, inputs: Sequence[Any]) -> list[torch.Size]:
        """The shapes of the outputs for these inputs: the reference run once on meta tensors
        per set of input shapes, dtypes and other arguments (a few microseconds after that)."""
        key = tuple(
            (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor)
            else tuple(x) if isinstance(x, list) else x
            for x in inputs
        )  # fmt: skip
        shapes = self._output_shapes_seen.get(key)
        if shapes is None:
            meta = [
                torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x
                for x in inputs
            ]
            with _autocast.off(meta):
                out = self.reference(*meta)
            shapes = [o.shape for o in ((out,) if isinstance(out, torch.Tensor) else out)]
            if len(self._output_shapes_seen) >= 256:  # dynamic shapes: keep the newest
                self._output_shapes_seen.clear()
            self._output_shapes_seen[key] = shapes
        return shapes

    def _backward_fake(self, *args: Any) -> list[torch.Tensor]:
        inputs = args[self.outputs : -1]
        return [torch.empty_like(inputs[i]) for i in self.diff_index]

    def _reference_backward(
        self, grads: Sequence[torch.Tensor], inputs: Sequence[Any]
    ) -> list[torch.Tensor]:
        def f(*diff_values: torch.Tensor) -> Any:
            full = list(inputs)
            for i, value in zip(self.diff_index, diff_values):
                full[i] = value
            return self.reference(*full)

        _, vjp = torch.func.vjp(f, *(inputs[i] for i in self.diff_index))
        cotangents = grads[0] if self.outputs == 1 else tuple(grads)
        return [
            g.clone() if _shares(g, (*grads, *inputs)) else _like(g, inputs[i])
            for i, g in zip(self.diff_index, vjp(cotangents))
        ]

    # ------------------------------------------------------------------------------------------
    # Autograd: the ops' kernels for the dispatcher's Autograd keys. Called with grad mode on
    # and an input that requires grad, the forward goes through _Differentiable (its backward
    # calls the backward op), the backward op (create_graph=True) through _NoDerivative (an
    # error if anything backpropagates through it); otherwise straight to the kernels below
    # autograd (the backends, or the fake implementations while tracing).

    def _autograd_kernel(self, keyset: Any, *args: Any) -> Any:
        if _has_tangent(args) or _in_func_transform():
            # Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) and torch.func's
            # gradient transforms: the kernels have no JVP, and the autograd.Function above
            # cannot serve torch.func, so the call runs the reference, which PyTorch
            # differentiates every way.
            # (Copies: the reference may return views of its inputs, and under torch.func the
            # tensors are wrappers without a storage to compare.)
            *inputs, _backend = args
            self.last_backend = "torch"
            with _autocast.off(inputs):
                out = self.reference(*inputs)
            return out.clone() if isinstance(out, torch.Tensor) else tuple(o.clone() for o in out)
        if _needs_grad(args):
            return self._function.apply(self, keyset, *args)
        return _below_autograd(self._fwd, keyset, args)

    def _backward_autograd_kernel(self, keyset: Any, *args: Any) -> Any:
        if _has_tangent(args):
            raise RuntimeError(
                f"fastdit.{self.name}: forward-mode AD through its backward (a Hessian-vector "
                "product by forward-over-reverse) is not available"
            )
        if _needs_grad(args):
            return list(self._no_derivative.apply(self, keyset, *args))
        return _below_autograd(self._bwd, keyset, args)

    def _setup_context(self, ctx: Any, inputs: Sequence[Any], output: Any) -> None:
        *op_inputs, backend = inputs
        tensors = [i for i, x in enumerate(op_inputs) if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(*(op_inputs[i] for i in tensors))
        ctx.tensor_index = tensors
        ctx.others = [None if isinstance(x, torch.Tensor) else x for x in op_inputs]
        ctx.backend = backend
        outs = (output,) if self.outputs == 1 else output
        ctx.out_meta = [(o.shape, o.dtype, o.device) for o in outs]

    def _autograd_backward(self, ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        inputs = list(ctx.others)
        for i, t in zip(ctx.tensor_index, ctx.saved_tensors):
            inputs[i] = t
        grads = tuple(
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads, ctx.out_meta)
        )
        if torch.compiler.is_compiling() or not ctx.checked:
            result = self._bwd(*grads, *inputs, ctx.backend)
        else:
            _CHECKED.op = self  # the forward's checked arguments, grads shaped like its outputs
            try:
                result = self._bwd(*grads, *inputs, ctx.backend)
            finally:
                _CHECKED.op = None
        out: list[Any] = [None] * (len(inputs) + 1)  # + the backend argument
        for i, g in zip(self.diff_index, result):
            out[i] = g
        return tuple(out)


class _Differentiable(torch.autograd.Function):
    """An op's forward on the backends (below autograd), recorded for its backward op."""

    @staticmethod
    def forward(ctx: Any, op: Op, keyset: Any, *args: Any) -> Any:
        checked = getattr(_CHECKED, "op", None) is op  # (the forward's implementation takes it)
        out = _below_autograd(op._fwd, keyset, args)
        op._setup_context(ctx, args, out)
        ctx.op = op
        ctx.checked = checked
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        return (None, None, *ctx.op._autograd_backward(ctx, *grads))


class _NoDerivative(torch.autograd.Function):
    """An op's backward computed under create_graph=True: the gradients, recorded so that
    backpropagating through them (a second derivative through the op) is an error, not a
    silent zero."""

    @staticmethod
    def forward(ctx: Any, op: Op, keyset: Any, *args: Any) -> tuple[torch.Tensor, ...]:
        out = _below_autograd(op._bwd, keyset, args)
        ctx.name = op.name
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        raise RuntimeError(
            f"fastdit.{ctx.name}: its backward is not differentiable: a second derivative "
            "through this op (a gradient penalty on its input, a Hessian-vector product) "
            "is not available"
        )


def _below_autograd(op: Any, keyset: Any, args: Sequence[Any]) -> Any:
    """``op(*args)`` dispatched past the Autograd keys: to the backends, or the fakes while
    tracing."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _has_tangent(args: Sequence[Any]) -> bool:
    """True when forward-mode AD is on and an argument carries a tangent (one module read when
    it is off, the usual case)."""
    level = _forward_ad._current_level
    return level >= 0 and any(
        isinstance(a, torch.Tensor) and torch._VF._unpack_dual(a, level).tangent is not None
        for a in args
    )


_FUNC_GRAD_LAYERS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def _in_func_transform() -> bool:
    """True inside torch.func.grad, vjp, jacrev, jacfwd, hessian, jvp (a functorch gradient
    layer is innermost; torch.compile's tracing uses none)."""
    interpreter = torch._C._functorch.peek_interpreter_stack()
    return interpreter is not None and interpreter.key() in _FUNC_GRAD_LAYERS


def _needs_grad(args: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )


def lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported on first call: registering a kernel never imports its backend
    (Triton may be missing; the backend's availability check says so before any call)."""

    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    call.__name__ = call.__qualname__ = f"{module}.{name}"
    return call


def _shares(t: torch.Tensor, inputs: Sequence[Any]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(
        isinstance(x, torch.Tensor) and ptr != 0 and x.untyped_storage().data_ptr() == ptr
        for x in inputs
    )


def _like(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g`` laid out as ``torch.empty_like(x)`` would be (what the fake backward promises)."""
    if g.stride() == x.stride():
        return g
    out = torch.empty_like(x)
    return g if out.stride() == g.stride() else out.copy_(g)


def _no_alias(out: Any, inputs: Sequence[Any]) -> Any:
    """Custom ops may not return views of their inputs: copy where the reference would."""
    storages = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor)}
    storages.discard(0)  # (empty tensors alias nothing)

    def fresh(o: torch.Tensor) -> torch.Tensor:
        return o.clone() if o.untyped_storage().data_ptr() in storages else o

    return fresh(out) if isinstance(out, torch.Tensor) else tuple(fresh(o) for o in out)
