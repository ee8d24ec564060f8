"""Reading the user's files for ``r2r-rewrite``: models, weights and example inputs, without running their code.

Model files come from strangers. What is guaranteed here:

- weights and ``--inputs`` files are only ever read as plain tensors (``torch.load(weights_only=True)``, or
  safetensors), and a TorchScript archive is refused as a model, weights or inputs alike;
- unless ``--trust-pickle`` is given, a ``.pt``/``.pth`` model is read with ``weights_only=True`` too (a
  full-module pickle is refused), and a ``.pt2`` is read with torch.export's own reader but no pickle beyond
  plain tensors, no compiled (AOTInductor) or TorchScript code, no graph call to anything but an operator,
  and no shape expression that is not shape arithmetic (``_no_code_from_archive``);
- ``package.module:factory`` imports and calls code the user names on purpose.

Every refusal is a :class:`UsageError` with a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import operator
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from r2r_fx.cli_errors import UsageError, first_line
from r2r_fx.compat import pt2_code_paths
from r2r_fx.estimate import available_memory, format_bytes
from r2r_fx.input_files import input_file, model_kind, refuse_torchscript, zip_names

__all__ = ["example_inputs", "load_model"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


class _PickleRefused(UsageError):
    """A .pt2 would need unpickling (or native code) to load; not a RuntimeError so torch does not swallow it."""


# What the .pt2 reader refused: torch wraps and sometimes swallows exceptions raised inside its reader.
_REFUSALS: list[str] = []


def _refusal(message: str) -> _PickleRefused:
    _REFUSALS.append(message)
    return _PickleRefused(message)


# ---------------------------------------------------------------- model files


def load_model(
    spec: str, args: argparse.Namespace
) -> tuple[nn.Module, tuple[Any, ...] | None, str, torch.fx.GraphModule | None]:
    """(model, stored example inputs or None, display name, the graph when the file already is one)."""
    kind = model_kind(spec, args)
    if kind == "pt2":
        gm, inputs = _load_pt2(spec, args.trust_pickle)
        return gm, inputs, os.path.basename(spec), gm
    if kind == "pickle":
        return _load_pickle(spec, args.trust_pickle), None, os.path.basename(spec), None
    return _load_factory(spec, args.weights, args.weights_key), None, spec, None


# ---------------------------------------------------------------- .pt2 archives, read without running code from them

# What torch's serializer writes for shape expressions (``sympy.srepr``: ``Symbol('s77', positive=True,
# integer=True)``, ``Mul(Integer(2), ...)``, its own FloorDiv & co. come as ``locals``): nothing else is evaluated.
_SYMPY_NAMES = frozenset(
    "Symbol Dummy Integer Rational Float Add Mul Pow Mod Max Min Abs floor ceiling Eq Ne Lt Le Gt Ge "
    "StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Piecewise ExprCondPair "
    "true false True False BooleanTrue BooleanFalse oo zoo nan Infinity NegativeInfinity NaN IntInfinity "
    "NegativeIntInfinity int_oo Zero One NegativeOne Half sqrt "
    "positive negative nonnegative nonpositive integer real finite infinite zero nonzero even odd commutative "
    "precision evaluate".split()
)
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")


class _SafeSympy:
    """``sympy`` for torch's deserializer, whose ``sympify`` (an ``eval``) only sees shape arithmetic."""

    def __init__(self, sympy: Any) -> None:
        self._sympy = sympy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sympy, name)

    def sympify(self, expr: Any, *a: Any, locals: Mapping[str, Any] | None = None, **kw: Any) -> Any:  # noqa: A002
        if isinstance(expr, str) and not _is_shape_arithmetic(expr, set(locals or {})):
            raise _refusal(
                f"the archive holds a shape expression that is not shape arithmetic ({expr[:60]!r}): "
                "it would run as code; refused"
            )
        return self._sympy.sympify(expr, *a, locals=locals, **kw)


def _is_shape_arithmetic(expr: str, known: set[str]) -> bool:
    """Only whitelisted names, numbers, operators and quoted symbol names: no attribute, item or dunder access."""
    if "__" in expr or re.search(r"[^A-Za-z0-9_ +\-*/%()<>=!,.&|~']", expr):
        return False
    if re.search(r"(?<![0-9])\.|\.(?![0-9])", expr):  # a dot only inside a number
        return False
    if any(not re.fullmatch(r"[A-Za-z0-9_.+\-/ ]*", q) for q in re.findall(r"'([^']*)'", expr)):
        return False
    if expr.count("'") % 2:
        return False
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr)
    return all(n in known or n in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(n) for n in names)


class _NoPickle:
    """``pickle`` for torch's archive reader, without ``loads``/``load``."""

    def __getattr__(self, name: str) -> Any:
        if name in ("loads", "load", "Unpickler"):
            raise _refusal("the archive holds a pickled object (opaque constant): it would run code")
        return getattr(pickle, name)


def _refuse_native(*args: Any, **kwargs: Any) -> Any:
    raise _refusal("the archive holds compiled code or a TorchScript object")


# Plain functions a graph may call besides registered operators (torch's own symbolic-shape ops come from serde).
_OPERATOR_FUNCTIONS = frozenset(
    getattr(operator, name)
    for name in (
        "add sub mul truediv floordiv mod pow neg pos abs and_ or_ xor invert not_ eq ne lt le gt ge "
        "getitem lshift rshift matmul truth"
    ).split()
)


def _is_operator(target: Any, sym_ops: Any) -> bool:
    """A registered operator (ATen, custom, higher-order), a symbolic-shape op, or a pure operator/math function."""
    from r2r_fx.compat import HigherOrderOperator, OpOverload, OpOverloadPacket

    if isinstance(target, (str, OpOverload, OpOverloadPacket, HigherOrderOperator)):
        return True  # a string stays unresolved: torch's reader refuses it itself
    try:
        if target in sym_ops or target in _OPERATOR_FUNCTIONS:
            return True
    except TypeError:  # unhashable
        return False
    name = getattr(target, "__name__", "")
    return getattr(math, name, None) is target and callable(target)


@contextlib.contextmanager
def _no_code_from_archive() -> Iterator[None]:
    """Load with torch.export.load's internals, but no pickle beyond plain tensors and no eval of stored text.

    torch 2.x falls back to ``torch.load(weights_only=False)`` for example inputs and pickled tensors
    (``torch/_export/serde/serialize.py: deserialize_torch_artifact``, ``torch/export/pt2_archive/_package.py``),
    ``pickle.loads`` for opaque constants, TorchScript unpickling for custom objects, ``dlopen`` for AOTInductor
    libraries, and ``sympy.sympify`` (an ``eval``) for shape expressions: each is forced safe or refused here.
    """
    try:
        paths = pt2_code_paths()
    except RuntimeError as exc:
        raise _refusal(f"{exc}; it cannot be loaded without running code from it") from None
    real_load = torch.load
    sym_ops = getattr(*paths["sym_ops"])

    def weights_only_load(f: Any, *a: Any, **kw: Any) -> Any:
        kw["weights_only"] = True
        try:
            return real_load(f, *a, **kw)
        except pickle.UnpicklingError as exc:
            raise _refusal(
                f"it holds a pickle that is not plain tensors (stored example inputs or tensors): {first_line(exc)}"
            ) from None

    real_operator = getattr(*paths["operator"])

    def operator_only(self: Any, serialized_target: str) -> Any:
        if serialized_target.startswith("#"):  # a registered extension's own operator
            return real_operator(self, serialized_target)
        target = real_operator(self, serialized_target)  # attribute look-ups only; nothing is called yet
        if not _is_operator(target, sym_ops):
            raise _refusal(f"its graph calls {serialized_target!r}, which is not an operator: it would run as code")
        return target

    replacements = {
        "torch_load": weights_only_load,
        "sympy": _SafeSympy(getattr(*paths["sympy"])),
        "pickle": _NoPickle(),
        "aoti": _refuse_native,
        "native_pickle": _refuse_native,
        "operator": operator_only,
    }
    patches = [(*paths[name], value) for name, value in replacements.items()]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _pt2_needs_trust(path: str, names: list[str]) -> str:
    """Why this archive cannot load without running code from it ("" when it can).

    Pickled tensors and example inputs need no refusal here: they load with ``weights_only=True``
    (``_no_code_from_archive``), which refuses anything but plain tensors and containers.
    """
    if any("/data/aotinductor/" in n for n in names):
        return "it holds AOTInductor compiled code (a shared library that would be loaded)"
    with zipfile.ZipFile(path) as z:
        for n in names:
            if not n.endswith("_constants_config.json"):
                continue
            try:
                config = json.loads(z.read(n)).get("config", {})
            except (ValueError, AttributeError):
                return ""  # malformed: torch's reader gives the error
            for fqn, meta in config.items() if isinstance(config, dict) else ():
                if isinstance(meta, dict) and str(meta.get("path_name", "")).startswith(("custom_obj", "opaque")):
                    return f"it stores the constant {fqn!r} as a pickled object (a TorchScript or opaque object)"
    return ""


def _load_pt2(path: str, trust: bool) -> tuple[torch.fx.GraphModule, tuple[Any, ...] | None]:
    names = zip_names(path)
    if names is None:
        raise UsageError(f"cannot read {path} as a torch.export program: not a .pt2 (zip) archive")
    refusal = "" if trust else _pt2_needs_trust(path, names)
    if refusal:
        raise UsageError(f"{path}: {refusal}; loading it runs code from the file. Only if you trust it: --trust-pickle")
    program = _read_program(path, trust)
    from r2r_fx.capture import from_exported_program

    inputs = None
    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        inputs = tuple(args) if not kwargs else None
    return from_exported_program(program), inputs


# Packages whose output classes a .pt2 may name: imported (installed code, not the file's) so torch can read it.
_OUTPUT_TYPE_PACKAGES = ("transformers",)


def _read_program(path: str, trust: bool, retried: bool = False) -> Any:
    _REFUSALS.clear()
    swallowed: list[BaseException] = []
    try:
        with _torch_swallowed(swallowed), contextlib.nullcontext() if trust else _no_code_from_archive():
            program = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a broken archive
        if _REFUSALS:
            raise UsageError(f"{path}: {_REFUSALS[0]}. Only if you trust the file: --trust-pickle") from None
        cause = swallowed[0] if swallowed else exc
        missing = re.search(r"Deserializing ([\w.]+) in pytree is not registered", str(cause))
        if missing and not retried:
            module = missing.group(1).rpartition(".")[0]
            if module.split(".")[0] in _OUTPUT_TYPE_PACKAGES:
                with contextlib.suppress(Exception):
                    importlib.import_module(module)
                    return _read_program(path, trust, retried=True)
            raise UsageError(
                f"cannot read {path}: its outputs are {missing.group(1)} objects, which torch reads only once that "
                "package is imported; save the program with plain outputs (tuples, dicts)"
            ) from None
        raise UsageError(f"cannot read {path} as a torch.export program: {first_line(cause)}") from exc
    if _REFUSALS:  # refused inside torch, which went on without it: still refused
        raise UsageError(f"{path}: {_REFUSALS[0]}. Only if you trust the file: --trust-pickle")
    return program


@contextlib.contextmanager
def _torch_swallowed(found: list[BaseException]) -> Iterator[None]:
    """Collect the exceptions torch.export.load logs and replaces by "check the warnings above"."""

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                found.append(record.exc_info[1])

    log = logging.getLogger("torch.export")
    handlers, level, propagate = log.handlers, log.level, log.propagate
    log.handlers, log.propagate = [Catch()], False  # torch's own handler would print it
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.handlers, log.propagate = handlers, propagate
        log.setLevel(level)


# ---------------------------------------------------------------- pickles, factories and weights


def _load_pickle(path: str, trust: bool) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            raise UsageError(
                f"{path} is a full-module pickle: loading it runs code stored in the file. Only if you trust "
                "the file, pass --trust-pickle (or save a state_dict and use package.module:factory --weights)"
            ) from exc
        obj = _load_trusted(path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: corrupt or truncated ({first_line(exc)})") from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        hint = "" if _looks_like_state_dict(obj) else " --weights-key KEY"
        raise UsageError(
            f"{path} holds a state_dict or checkpoint, not a model: use package.module:factory --weights {path}{hint}"
        )
    raise UsageError(f"{path} holds a {type(obj).__name__}, not an nn.Module")


def _load_trusted(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot unpickle {path}: {first_line(exc)}") from exc


def _load_factory(spec: str, weights: str | None, key: str | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"bad model {spec!r}: expected package.module:factory")
    if "" not in sys.path and os.getcwd() not in sys.path:  # as ``python -m`` does
        sys.path.insert(0, os.getcwd())
    try:
        factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import {spec}: {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module fails on import
        raise UsageError(f"importing {module_name} failed: {type(exc).__name__}: {first_line(exc)}") from exc
    if not callable(factory):
        raise UsageError(f"{spec} is a {type(factory).__name__}, not a callable factory")
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{spec}() failed: {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    if weights:
        _fit_weights(model, _load_weights(weights, key), weights, spec)
    return model


def _looks_like_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _load_weights(path: str, key: str | None) -> dict[str, torch.Tensor]:
    input_file(path, "--weights")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        refuse_torchscript(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except UsageError:
        raise
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"--weights {path} holds pickled objects beyond tensors (a full model?), which are not loaded: "
            f"save model.state_dict() instead ({first_line(exc)})"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read weights {path}: {first_line(exc)}") from exc
    return _state_dict_in(obj, path, key)


def _state_dict_in(obj: Any, path: str, key: str | None) -> dict[str, torch.Tensor]:
    """The state_dict itself, the one under ``key``, or the only state_dict inside a checkpoint dict."""
    if not isinstance(obj, Mapping):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    if key is not None:
        if key not in obj:
            raise UsageError(f"--weights-key {key!r} is not in {path}; its keys: {', '.join(map(str, obj))}")
        obj = obj[key]
        if not _looks_like_state_dict(obj):
            raise UsageError(f"{path}[{key!r}] is not a state_dict (a dict of tensors)")
        return dict(obj)
    if _looks_like_state_dict(obj):
        return dict(obj)
    inside = [k for k, v in obj.items() if _looks_like_state_dict(v)]
    if len(inside) == 1:
        return dict(obj[inside[0]])
    if inside:
        raise UsageError(f"{path} is a checkpoint with several state_dicts ({', '.join(inside)}): pick --weights-key")
    raise UsageError(f"{path} holds no state_dict (keys: {', '.join(map(str, list(obj)[:12]))}); see --weights-key")


def _fit_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str, spec: str) -> None:
    expected = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    sizes = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{len(items)} {what}: {', '.join(items)}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("size mismatch (file vs model)", sizes))
        if items
    ]
    if problems:
        raise UsageError(f"--weights {path} does not fit {spec}: " + "; ".join(problems))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"--weights {path} does not fit {spec}: {' '.join(str(exc).split())}") from exc


# ---------------------------------------------------------------- example inputs


def example_inputs(args: argparse.Namespace, stored: tuple[Any, ...] | None) -> tuple[Any, ...]:
    if args.inputs:
        input_file(args.inputs, "--inputs")
        refuse_torchscript(args.inputs)
        try:
            obj = torch.load(args.inputs, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UsageError(
                f"--inputs {args.inputs} holds pickled objects beyond tensors, which are not loaded"
            ) from None
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot read inputs {args.inputs}: {first_line(exc)}") from exc
        inputs = (obj,) if isinstance(obj, torch.Tensor) else tuple(obj) if isinstance(obj, (tuple, list)) else None
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise UsageError(f"{args.inputs} must hold a tensor or a non-empty tuple/list of tensors")
        return inputs
    if args.input_shape:
        return tuple(_parse_shape(s) for s in args.input_shape)
    if stored:
        return stored
    raise UsageError("no example inputs: give --input-shape (e.g. 1,3,224,224) or --inputs FILE")


def _parse_shape(text: str) -> torch.Tensor:
    dtype_name, _, dims = text.rpartition(":")
    dtype = _DTYPES.get(dtype_name or "float32")
    if dtype is None:
        raise UsageError(f"unknown dtype {dtype_name!r} in --input-shape {text}; one of {', '.join(_DTYPES)}")
    parts = dims.split(",")
    if not all(re.fullmatch(r"\s*\d{1,12}\s*", d) for d in parts):
        raise UsageError(f"bad --input-shape {text!r}: expected comma-separated integers such as 1,3,224,224")
    shape = [int(d) for d in parts]
    if any(d <= 0 for d in shape):
        raise UsageError(f"bad --input-shape {text!r}: sizes must be positive")
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    available = available_memory()
    if size > available // 4:
        raise UsageError(
            f"--input-shape {text}: one example input would take {format_bytes(size)}, "
            f"more than a quarter of the {format_bytes(available)} of memory available"
        )
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.randint(0, 2, shape, generator=generator, dtype=dtype)
