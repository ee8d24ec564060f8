"""Checks of the user's input files for ``r2r-rewrite`` that need no torch: run before anything is imported
or loaded, so a wrong path fails in a fraction of a second with one line."""

from __future__ import annotations

import argparse
import os
import zipfile

from r2r_fx.cli_errors import UsageError

__all__ = ["check_input_files", "input_file", "model_kind", "refuse_torchscript", "zip_names"]

_MODEL_SUFFIXES = (".pt2", ".pt", ".pth", ".safetensors")


def model_kind(spec: str, args: argparse.Namespace) -> str:
    """ "pt2", "pickle" or "factory" for the model argument ``spec``; a UsageError when it is none of them."""
    if os.path.exists(spec) or spec.endswith(_MODEL_SUFFIXES):
        if os.path.isdir(spec):
            raise UsageError(f"model {spec} is a directory, not a model file")
        if not os.path.isfile(spec):
            raise UsageError(
                f"model {spec} is not a regular file" if os.path.exists(spec) else f"model file not found: {spec}"
            )
        readable(spec, "model file")
        if args.weights:
            raise UsageError("--weights only applies to a package.module:factory model")
        if spec.endswith(".safetensors"):
            raise UsageError(f"{spec} holds weights only: use package.module:factory --weights {spec}")
        refuse_torchscript(spec)
        return "pt2" if spec.endswith(".pt2") else "pickle"
    if ":" in spec:
        return "factory"
    raise UsageError(f"model file not found: {spec} (nor is it a package.module:factory spec)")


def check_input_files(args: argparse.Namespace) -> None:
    """The model, ``--weights`` and ``--inputs`` files exist, are readable and are not TorchScript."""
    model_kind(args.model, args)
    for flag, path in (("--weights", args.weights), ("--inputs", args.inputs)):
        if path:
            input_file(path, flag)
            if not path.endswith(".safetensors"):
                refuse_torchscript(path)


def input_file(path: str, flag: str) -> None:
    """``path`` (given with ``flag``, e.g. ``--weights``) is a regular file this process can read."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory")
    if not os.path.isfile(path):
        raise UsageError(f"{flag.lstrip('-')} file not found: {path}")
    readable(path, flag)


def readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def zip_names(path: str) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def refuse_torchscript(path: str) -> None:
    names = zip_names(path) or []
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise UsageError(
            f"{path} is a TorchScript archive (torch.jit.save), which is not supported: save the model with "
            "torch.export.save (.pt2), or its state_dict for package.module:factory --weights"
        )
