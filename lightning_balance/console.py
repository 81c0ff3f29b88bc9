"""The ``lightning-balance`` command: ``diagnose``, ``compare``, ``benchmark`` and ``demo``.

    lightning-balance diagnose --model my_models.py:AVModel --checkpoint last.ckpt --data my_data.py:make_data
    lightning-balance compare --model my_models.py:AVModel --data my_data.py:make_data --methods baseline cml ogm_ge
    lightning-balance benchmark --methods baseline cml --seeds 0 1 2      # the project's benchmark (source tree)
    lightning-balance demo                                                 # diagnose, fix, verify (source tree)

``--model`` and ``--data`` name an object as ``package.module:name`` or ``path/to/file.py:name``: a
LightningModule class or a function returning a module; a LightningDataModule, its class, or a function
(``seed=`` optional) returning one.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import runpy
import sys
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["load_object", "main"]


def load_object(spec: str) -> Any:
    """The object named by ``"package.module:name"`` or ``"path/to/file.py:name"`` (a clear error otherwise)."""
    if ":" not in spec:
        raise SystemExit(f"{spec!r}: name an object as 'package.module:name' or 'path/to/file.py:name'.")
    where, _, name = spec.rpartition(":")
    if where.endswith(".py") or os.sep in where:
        if not os.path.isfile(where):
            raise SystemExit(f"{where!r}: no such file.")
        folder = os.path.dirname(os.path.abspath(where))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module_name = os.path.splitext(os.path.basename(where))[0]
        loader_spec = importlib.util.spec_from_file_location(module_name, where)
        if loader_spec is None or loader_spec.loader is None:
            raise SystemExit(f"{where!r}: cannot be imported as Python.")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(where)
    try:
        return getattr(module, name)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise SystemExit(f"{where!r} has no {name!r}; it defines {public[:20]}.") from None


def _datamodule(spec: str, seed: int) -> Any:
    from lightning_balance.references import datamodule_for

    try:
        return datamodule_for(load_object(spec), seed)
    except TypeError as err:
        raise SystemExit(f"--data {spec}: {err}") from None


def _module(spec: str, checkpoint: Optional[str]) -> Any:
    import lightning.pytorch as pl
    import torch

    obj = load_object(spec)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint else None
    if (isinstance(state, dict) and "pytorch-lightning_version" in state and inspect.isclass(obj)
            and issubclass(obj, pl.LightningModule)):  # a Lightning checkpoint: its hyperparameters rebuild the module
        return obj.load_from_checkpoint(str(checkpoint), map_location="cpu")
    module = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if state is not None:  # a state_dict, or a checkpoint holding one
        module.load_state_dict(state.get("state_dict", state))
    return module


def _inputs(pairs: Optional[Sequence[str]]) -> Optional[dict[str, str]]:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--inputs takes modality=key pairs (e.g. audio=wav), got {pair!r}.")
        m, _, key = pair.partition("=")
        out[m] = key
    return out


def _source_script(name: str) -> str:
    """``examples/<name>`` of the source tree this package runs from (an editable install or a clone)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "examples", name)
    if not os.path.isfile(path):
        raise SystemExit(f"examples/{name} ships with the source repository, not with the installed package: run this "
                         f"command from a clone (pip install -e .).")
    return path


def _run_script(name: str, argv: Sequence[str]) -> None:
    path = _source_script(name)
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(path))
    runpy.run_path(path, run_name="__main__")


def _diagnose(args: argparse.Namespace) -> None:
    from lightning_balance.diagnosis import diagnose

    dm = _datamodule(args.data, args.seed)
    module = _module(args.model, args.checkpoint)
    dm.setup("fit" if args.split == "val" else "test")
    loader = dm.val_dataloader() if args.split == "val" else dm.test_dataloader()
    kwargs: dict[str, Any] = {}
    if args.reference_epochs > 0:
        kwargs = {"fit_references": dm, "reference_epochs": args.reference_epochs,
                  "reference_kwargs": {"inputs": _inputs(args.inputs), "target_key": args.target_key}}
    report = diagnose(module, loader, plot=args.plot, **kwargs)
    print(report)
    if args.plot:
        print(f"\nfigure: {args.plot}")


def _compare(args: argparse.Namespace) -> None:
    from lightning_balance.compare import compare_methods

    make = load_object(args.model)

    def data(seed: int) -> Any:
        return _datamodule(args.data, seed)

    result = compare_methods(make, data, args.methods, seeds=args.seeds, max_epochs=args.epochs,
                             references=not args.no_references, diagnose=not args.no_diagnose, out=args.out,
                             reference_kwargs={"inputs": _inputs(args.inputs), "target_key": args.target_key})
    print(result.table())
    if args.out:
        print(f"\nsaved to {args.out}/compare.json, compare.md, compare.png")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``lightning-balance`` command."""
    parser = argparse.ArgumentParser(prog="lightning-balance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="module:name or file.py:name of a LightningModule class or factory")
        p.add_argument("--data", required=True, help="module:name or file.py:name of a LightningDataModule or factory")
        p.add_argument("--inputs", nargs="*", help="modality=batch-key pairs, when the batch keys differ from the names")
        p.add_argument("--target-key", default="target", help="the batches' target key (default: target)")

    d = sub.add_parser("diagnose", help="diagnose a trained model: dominance, under-learned encoders, what to try")
    common(d)
    d.add_argument("--checkpoint", help="a Lightning checkpoint (or a state_dict file) of the trained model")
    d.add_argument("--split", choices=["val", "test"], default="val", help="the samples to diagnose (default: val)")
    d.add_argument("--reference-epochs", type=int, default=20,
                   help="epochs to train each modality alone as the reference (0: no references)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--plot", help="write the diagnosis figure to this PNG")
    c = sub.add_parser("compare", help="compare balancing methods on your model and data over seeds")
    common(c)
    c.add_argument("--methods", nargs="+", default=["baseline", "uni_losses", "cml", "ogm_ge"],
                   help="names of lightning_balance.compare.METHODS, stacks as a+b (the first is the reference)")
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    c.add_argument("--epochs", type=int, default=20)
    c.add_argument("--out", default="results/compare")
    c.add_argument("--no-references", action="store_true", help="skip the modalities trained alone")
    c.add_argument("--no-diagnose", action="store_true", help="skip the encoders' probes")
    sub.add_parser("benchmark", help="the project's benchmark runner (examples/benchmark.py; its own options follow)",
                   add_help=False)
    sub.add_parser("demo", help="diagnose, fix and verify on AV-Digits (examples/demo.py)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "benchmark":
        _run_script("benchmark.py", rest)
    elif args.command == "demo":
        _run_script("demo.py", rest)
    else:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from lightning_balance._errors import ModalityContractError

        try:
            {"diagnose": _diagnose, "compare": _compare}[args.command](args)
        except (ModalityContractError, ValueError) as err:  # the user's input: the message, not a traceback
            parser.exit(2, f"lightning-balance {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()
