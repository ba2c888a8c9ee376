"""``moescope`` command line: parse, validate, make one library call, print.

Every user mistake surfaces as a :class:`~analysis.errors.MoescopeError` and is printed as one
line (``moescope: error: ...``, exit status 2); so is any other exception (``--debug`` adds its
traceback). Ctrl-C exits with status 130, SIGTERM with 143, both after cleaning up; a closed
stdout (``moescope families | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback

from moescope.analysis.core.errors import MoescopeError
from moescope.analysis.run.commands import (
    cmd_analyze,
    cmd_cache,
    cmd_dashboard,
    cmd_eval,
    cmd_experiments,
    cmd_export,
    cmd_families,
    cmd_grid,
    cmd_info,
    cmd_plan,
    cmd_prune,
    cmd_strategies,
    strategy_flag_names,
)
from moescope.analysis.run.report import ProgressBars

ALLOW_PICKLE_HELP = ("UNSAFE: also load pickled weights (pytorch_model.bin); unpickling a crafted file runs code. "
                     "Off by default: moescope reads safetensors only")
TRANSFORMERS_ONLY_HELP = ("accept a plan with different expert counts per layer for a family moescope's vLLM plugin "
                          "does not serve: the folder loads in transformers (trust_remote_code=True) but not in vLLM")


def build_parser(strategy_flags: bool = True) -> argparse.ArgumentParser:
    """The whole parser. ``strategy_flags=False`` leaves out the ``plan`` flags generated from the
    strategy registry, whose import pulls in torch (:func:`main` adds them only for ``plan``)."""
    parser = argparse.ArgumentParser(
        prog="moescope",
        description="Find, drop and merge redundant experts in Mixture-of-Experts language models.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the Python traceback too (may stand anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("model", nargs="?", default="demo", metavar="MODEL",
                       help="'demo' (default), a local model folder, or a hub id")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow custom modelling code from the model's repository (off by default)")
        p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
        return p

    p = model_command("info", "Show a model's MoE structure: layers, experts, routing, parameter counts.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--dtype", default=None, help="report bytes for this dtype (default: the checkpoint's)")
    p.set_defaults(func=cmd_info)

    p = model_command("analyze", "Compute (or read from the cache) every similarity, routing statistic and criterion.")
    p.add_argument("--calib", default="demo:all", help="calibration source: demo:DOMAIN | demo:all | file:PATH | "
                   "hf:NAME[:CONFIG]:SPLIT[:FIELD] (default demo:all)")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", default="random", choices=["random", "first"])
    p.add_argument("--metrics", default="all",
                   help="comma-separated metric families: similarity, weights, routing, activations, gradients "
                        "(the one that needs a backward pass), or all (default)")
    p.add_argument("--similarity-tokens", type=int, default=8192, help="tokens used for output similarities")
    p.add_argument("--augment", type=float, default=0.0,
                   help="add this × T mixed rows to the output similarities (group-and-merge augmentation)")
    p.add_argument("--augment-mode", default="embeddings", choices=["embeddings", "hidden_states"],
                   help="what is mixed: embeddings (Algorithm 1's mixup of two sequences' token embeddings, run "
                        "through the model) or hidden_states (each layer's input rows; cheaper)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder/hub id when MODEL has none")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, or auto (accelerate device map)")
    p.add_argument("--offload", default=None, metavar="DIR",
                   help="keep decoder layers on disk in DIR and load one at a time (models larger than memory)")
    p.add_argument("--export", default=None, metavar="DIR", help="write similarity/criteria/routing/coactivation CSVs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_analyze)

    def data_args(p, flag: str, default: str, samples: int, seq_len: int) -> None:
        p.add_argument(flag, default=default, help=f"data source (default {default}): demo:DOMAIN | demo:all | "
                       "file:PATH | hf:NAME[:CONFIG]:SPLIT[:FIELD]")
        p.add_argument("--samples", type=int, default=samples,
                       help=(f"token windows read from the data source (default {samples})" if samples is not None
                             else "calibration windows read from the data source (default: the preset's calibration "
                                  "size, else 32)") + "; more windows give steadier numbers and a different plan or "
                            "grid than fewer")
        p.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per window (default {seq_len})")
        p.add_argument("--sampling", default="random", choices=["random", "first"],
                       help="random: seeded window offsets (default); first: consecutive windows from each "
                            "domain's start")
        p.add_argument("--tokenizer", default=None, help="tokenizer folder/hub id when MODEL has none")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--device", default=None)
        p.add_argument("--json", action="store_true")

    p = model_command("grid", "Single-expert-drop perplexity grid (layer × expert), cached.")
    data_args(p, "--eval", "demo:all", 16, 256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_grid)

    p = model_command("plan", "Choose experts to drop or merge with a strategy; write a PruningPlan JSON.")
    p.add_argument("--strategy", default=None, help="a registered strategy (see `moescope strategies`)")
    p.add_argument("--preset", default=None,
                   help="a paper's recipe: a named set of a strategy's parameters, each overridable by its flag "
                        "(see `moescope strategies`); its calibration size is the --samples default")
    data_args(p, "--calib", "demo:all", None, 256)
    p.add_argument("--seed", type=int, default=None, help="calibration sampling seed (and the strategy's seed)")
    for name, param in (strategy_flag_names() if strategy_flags else {}).items():  # one per strategy parameter
        flag = "--" + name.replace("_", "-")
        if param.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=param.help)
        else:
            kind = param.type if param.type in (int, float) else str
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=name.upper(), help=param.help)
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="any strategy parameter as JSON or text")
    p.add_argument("-o", "--output", required=True, help="where to write plan.json")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("strategies", help="List every strategy and its parameters.",
                       description="List every registered strategy with its parameters, types, defaults and choices.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_strategies)

    def eval_args(p) -> None:
        g = p.add_argument_group("evaluation")
        g.add_argument("--ppl", nargs="*", default=None, metavar="SRC",
                       help="perplexity sources: demo:DOMAIN | demo:all | file:PATH | hf:NAME[:CONFIG]:SPLIT[:FIELD]")
        g.add_argument("--samples", type=int, default=96, help="perplexity windows in all (default 96)")
        g.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
        g.add_argument("--sampling", default="first", choices=["first", "random"],
                       help="first: consecutive windows from each domain's start (default); random: seeded offsets")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--stride", type=int, default=None, help="slide windows by this many tokens (default: no overlap)")
        g.add_argument("--tasks", nargs="*", default=[], metavar="TASK",
                       help="lm-eval tasks (local: moescope_demo_continuation, moescope_demo_ppl, "
                            "moescope_demo_ppl_DOMAIN; hub tasks such as arc_easy need the network)")
        g.add_argument("--limit", type=float, default=None, help="lm-eval samples per task (a fraction if < 1)")
        g.add_argument("--num-fewshot", type=int, default=None)
        g.add_argument("--batch-size", type=int, default=8)
        g.add_argument("--no-efficiency", action="store_true", help="skip the memory and tokens/s measurement")
        g.add_argument("--prompt-tokens", type=int, default=128, help="efficiency: prompt length (default 128)")
        g.add_argument("--new-tokens", type=int, default=32, help="efficiency: generated tokens (default 32)")
        g.add_argument("--repeats", type=int, default=5, help="efficiency: timed repeats, median (default 5)")
        g.add_argument("--skip-calib", default="demo:all",
                       help="calibration source for the dynamic-skipping β of the efficiency run, or none")

    p = model_command("prune", "Apply a PruningPlan, optionally evaluate it (an experiment), and export the folder.")
    p.add_argument("--plan", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output folder (only a folder moescope wrote: it carries .moescope-export)")
    p.add_argument("--force", action="store_true",
                   help="apply a plan made for another model (or other weights); recorded in the plan's provenance")
    p.add_argument("--transformers-only", action="store_true", help=TRANSFORMERS_ONLY_HELP)
    p.add_argument("--dtype", default="float32",
                   help="dtype of the written weights (a quantized checkpoint keeps its own format and dtypes)")
    p.add_argument("--merged-dtype", default=None, choices=None, metavar="bf16",
                   help="quantized checkpoints: write merged experts in bf16, listed in the config's "
                        "modules_to_not_convert (compressed-tensors: ignore), instead of requantizing them")
    p.add_argument("--offload", default=None, metavar="DIR",
                   help="evaluate the original and the pruned model with their decoder layers on disk in DIR, one "
                        "at a time (models larger than memory; quality only: add --no-efficiency). Without "
                        "evaluation, prune never loads the model: the checkpoint is rewritten shard by shard")
    p.add_argument("--json", action="store_true")
    eval_args(p)
    p.set_defaults(func=cmd_prune)

    p = model_command("eval", "Evaluate a model or exported folder: perplexity, lm-eval tasks, memory and speed.")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="Write an experiment's pruned model folder with its model card.",
                       description="Write an experiment's pruned model folder (weights, tokenizer, config, "
                                   "plan.json, experiment.json, README model card).")
    p.add_argument("experiment", metavar="ID", help="experiment id (or a unique prefix); see `moescope experiments ls`")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--transformers-only", action="store_true", help=TRANSFORMERS_ONLY_HELP)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("experiments", help="List, show and compare experiments.",
                       description="List, show and compare stored experiments.")
    esub = p.add_subparsers(dest="experiments_command", required=True, metavar="ACTION")
    c = esub.add_parser("ls", help="list experiments")
    c.add_argument("--model", default=None)
    c.add_argument("--json", action="store_true")
    c = esub.add_parser("show", help="one experiment in full")
    c.add_argument("id")
    c.add_argument("--json", action="store_true")
    c = esub.add_parser("compare", help="experiments side by side, the original as reference")
    c.add_argument("ids", nargs="+", metavar="ID")
    c.add_argument("--csv", nargs="?", const="-", default=None, metavar="PATH", help="CSV to PATH (or stdout)")
    c.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_experiments)

    p = sub.add_parser("cache", help="List or clear cached results.", description="List or clear cached results.")
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    for action, help_ in (("ls", "list cache entries"), ("clear", "remove cache entries")):
        c = csub.add_parser(action, help=help_)
        c.add_argument("--model", default=None, help="only entries of this model source or fingerprint prefix")
        c.add_argument("--kind", default=None, help="only entries of this kind (e.g. analysis)")
        c.add_argument("--verify", action="store_true",
                       help="check every file's sha256 too (default: presence and sizes from the manifest)")
        if action == "ls":
            c.add_argument("--json", action="store_true")
        else:
            c.add_argument("--damaged", action="store_true",
                           help="remove only damaged or unreadable entries (those `cache ls` marks damaged)")
    p.set_defaults(func=cmd_cache)

    help_ = "List every MoE model type transformers offers: supported, refused (with the reason) or not yet."
    p = sub.add_parser("families", help=help_, description=help_)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--markdown", action="store_true", help="print the README's family table")
    p.set_defaults(func=cmd_families)

    p = model_command("dashboard", "Open the dashboard in the browser (Streamlit).")
    p.add_argument("--address", default="localhost", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=cmd_dashboard)
    return parser


def _fault_hook() -> None:
    """Fault injection for the test suite (``tests/test_faults*.py``); does nothing unless the
    environment sets ``MOESCOPE_FAULT_AT``.

    ``MOESCOPE_FAULT_AT=progress:GLOB`` makes this process SIGKILL itself when a progress stage
    matching GLOB reports (e.g. ``progress:layers``, ``progress:evaluate pruned``);
    ``MOESCOPE_FAULT_AT=write:GLOB`` when it opens a file whose path matches GLOB for writing
    (e.g. ``write:*/out/config.json``). It is an audit hook, so it sees every write by any module
    without a call site in the code under test."""
    import os

    spec = os.environ.get("MOESCOPE_FAULT_AT")
    if not spec:
        return
    import fnmatch
    import signal

    kind, _, pattern = spec.partition(":")
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event: str, args: tuple) -> None:
        if kind == "progress" and event == "moescope.progress":
            hit = fnmatch.fnmatchcase(str(args[0]), pattern)
        elif kind == "write" and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            hit = bool(args[2] & writing) and fnmatch.fnmatchcase(os.path.abspath(os.fsdecode(args[0])), pattern)
        else:
            return
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def _library_bars_off_unless_terminal() -> None:
    """transformers / huggingface_hub draw their own bars (``Loading weights``) on stderr; off a
    terminal they are carriage-return noise in front of the one-line error, so switch them off."""
    if sys.stderr.isatty():
        return
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when they are imported
    if "transformers" in sys.modules:  # already imported (the CLI called in-process)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (its first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _take_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` may stand anywhere before a ``--``; it is taken out before parsing."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    return [a for i, a in enumerate(argv) if not (i < end and a == "--debug")], debug


def _one_line(err: BaseException) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    text = " ".join(str(err).split("\n", 1)[0].split())
    if len(text) > 300:
        text = text[:300] + " …"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _stdout_gone() -> int:
    """The reader of stdout went away (``moescope … | head``): stop quietly, as Unix tools do, with
    the status of a process ended by SIGPIPE; stdout is pointed at /dev/null so that the
    interpreter's final flush does not complain."""
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 128 + 13


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), so every ``finally`` and ``with``
    runs: child processes are stopped and temporary files removed, as for Ctrl-C."""
    import signal

    from moescope.analysis.core.processes import Terminated

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (the CLI called from a thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every exception ends here: a user mistake (:class:`MoescopeError`) and any
    other exception are one line on stderr, exit status 2 (``--debug`` prints the traceback too);
    Ctrl-C exits 130, SIGTERM 143 (both after cleaning up); a closed stdout ends quietly (141)."""
    from moescope.analysis.core.processes import Terminated

    argv = sys.argv[1:] if argv is None else list(argv)
    argv, debug = _take_debug(argv)
    # the registry's flags only where they are parsed: `moescope --help`, `cache ls` and the like
    # then start without importing torch
    try:
        parser = build_parser(strategy_flags=_command(argv) == "plan")
        args = parser.parse_args(argv)
    except BrokenPipeError:  # `moescope --help | head -1`
        return _stdout_gone()
    _fault_hook()
    _library_bars_off_unless_terminal()
    with _sigterm_as_interrupt():
        try:
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
            return code
        except BrokenPipeError:
            ProgressBars.close_all()
            return _stdout_gone()
        except MoescopeError as err:
            ProgressBars.close_all()
            if debug:
                traceback.print_exc()
            print(f"moescope: error: {err}", file=sys.stderr)
            return 2
        except Terminated:
            ProgressBars.close_all()
            print("moescope: terminated", file=sys.stderr)
            return 128 + 15
        except KeyboardInterrupt:
            ProgressBars.close_all()
            print("moescope: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - the one boundary: never a traceback for a user
            ProgressBars.close_all()
            if debug:
                traceback.print_exc()
                print(f"moescope: error: {_one_line(err)}", file=sys.stderr)
            else:
                print(f"moescope: error: {_one_line(err)} (run again with --debug for the traceback)",
                      file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
