"""``moescope`` command line: parse, validate, make one library call, print.

Every user mistake surfaces as a :class:`~analysis.errors.MoescopeError` and is printed as one
line (``moescope: error: ...``, exit status 2); so is any other exception (``--debug`` adds its
traceback). Ctrl-C exits with status 130, SIGTERM with 143, both after cleaning up; a closed
stdout (``moescope families | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import traceback

from moescope.analysis.core import defaults as D
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
EXPORT_DTYPE_HELP = ("dtype of the exported weights: float32, bfloat16 or float16 (default: the checkpoint's own, "
                     "tensor by tensor, so a pruned model is never larger than what it keeps)")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors one line (``moescope: error: …``, exit 2) pointing to the command's
    ``--help`` instead of dumping the usage first; subcommands inherit it."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"moescope: error: {message}; see `{self.prog} --help`\n")


MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take 0 .. 2^32 - 1


def seed_value(text: str) -> int:
    """``--seed``: a whole number from 0 to 2^32 − 1 (a negative one is refused here, not by numpy)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: a whole number from 0 to {MAX_SEED}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"invalid seed {value}: a whole number from 0 to {MAX_SEED}")
    return value


def build_parser(strategy_flags: bool = True) -> argparse.ArgumentParser:
    """The whole parser. ``strategy_flags=False`` leaves out the ``plan`` flags generated from the
    strategy registry, whose import pulls in torch (:func:`main` adds them only for ``plan``)."""
    parser = OneLineParser(
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
    p.add_argument("--calib", default=D.CALIB_SOURCE, help="calibration source: demo:DOMAIN | demo:all | file:PATH | "
                   f"hf:NAME[:CONFIG]:SPLIT[:FIELD] (default {D.CALIB_SOURCE})")
    p.add_argument("--samples", type=int, default=D.CALIB_SAMPLES,
                   help=f"calibration sequences (default {D.CALIB_SAMPLES}, as plan's and the dashboard's)")
    p.add_argument("--seq-len", type=int, default=D.CALIB_SEQ_LEN, help=f"tokens per sequence (default {D.CALIB_SEQ_LEN})")
    p.add_argument("--seed", type=seed_value, default=0)
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
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory the analysis would hold (weights, hidden states, expert outputs of the "
                        "similarity sample, gradients) from the config alone, and stop")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_analyze)

    def data_args(p, flag: str, default: str, samples: int, seq_len: int) -> None:
        p.add_argument(flag, default=default, help=f"data source (default {default}): demo:DOMAIN | demo:all | "
                       "file:PATH | hf:NAME[:CONFIG]:SPLIT[:FIELD]")
        p.add_argument("--samples", type=int, default=samples,
                       help=(f"token windows read from the data source (default {samples})" if samples is not None
                             else "calibration windows read from the data source (default: the preset's calibration "
                                  f"size, else {D.CALIB_SAMPLES}, as analyze's)") + "; more windows give steadier numbers and a different plan or "
                            "grid than fewer")
        p.add_argument("--seq-len", type=int, default=seq_len,
                       help=f"tokens per window (default {seq_len})" if seq_len is not None else
                       "tokens per calibration window (default: the preset paper's length, capped at the model's "
                       f"positions, else {D.CALIB_SEQ_LEN}, as analyze's)")
        p.add_argument("--sampling", default="random", choices=["random", "first"],
                       help="random: seeded window offsets (default); first: consecutive windows from each "
                            "domain's start")
        p.add_argument("--tokenizer", default=None, help="tokenizer folder/hub id when MODEL has none")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--device", default=None)
        p.add_argument("--json", action="store_true")

    p = model_command("grid", "Single-expert-drop perplexity grid (layer × expert), cached.")
    data_args(p, "--eval", D.EVAL_SOURCE, D.GRID_SAMPLES, D.GRID_SEQ_LEN)
    p.add_argument("--seed", type=seed_value, default=0)
    p.set_defaults(func=cmd_grid)

    p = model_command("plan", "Choose experts to drop or merge with a strategy; write a PruningPlan JSON.")
    p.add_argument("--strategy", default=None, help="a registered strategy (see `moescope strategies`)")
    p.add_argument("--preset", default=None,
                   help="a paper's recipe: a named set of a strategy's parameters, each overridable by its flag "
                        "(see `moescope strategies`); its calibration size is the --samples default")
    data_args(p, "--calib", D.CALIB_SOURCE, None, None)
    p.add_argument("--seed", type=seed_value, default=None, help="calibration sampling seed (and the strategy's seed)")
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
        g.add_argument("--samples", type=int, default=D.EVAL_SAMPLES,
                       help=f"perplexity windows in all (default {D.EVAL_SAMPLES}, as the Run page's)")
        g.add_argument("--seq-len", type=int, default=D.EVAL_SEQ_LEN, help=f"tokens per window (default {D.EVAL_SEQ_LEN})")
        g.add_argument("--sampling", default="first", choices=["first", "random"],
                       help="first: consecutive windows from each domain's start (default); random: seeded offsets")
        g.add_argument("--seed", type=seed_value, default=0)
        g.add_argument("--stride", type=int, default=None, help="slide windows by this many tokens (default: no overlap)")
        g.add_argument("--tasks", nargs="*", default=list(D.EVAL_TASKS), metavar="TASK",
                       help="lm-eval tasks (local: moescope_demo_continuation, moescope_demo_ppl, "
                            "moescope_demo_ppl_DOMAIN; hub tasks such as arc_easy need the network)")
        g.add_argument("--limit", type=float, default=D.TASK_LIMIT,
                       help=f"lm-eval samples per task (a fraction if < 1; default {D.TASK_LIMIT:g}, as the Run page's; "
                            "0: all)")
        g.add_argument("--num-fewshot", type=int, default=None)
        g.add_argument("--batch-size", type=int, default=8)
        g.add_argument("--no-efficiency", action="store_true", help="skip the memory and tokens/s measurement")
        g.add_argument("--prompt-tokens", type=int, default=D.PROMPT_TOKENS,
                       help=f"efficiency: prompt length (default {D.PROMPT_TOKENS})")
        g.add_argument("--new-tokens", type=int, default=D.NEW_TOKENS,
                       help=f"efficiency: generated tokens (default {D.NEW_TOKENS})")
        g.add_argument("--repeats", type=int, default=D.SPEED_REPEATS,
                       help=f"efficiency: timed repeats, median (default {D.SPEED_REPEATS})")
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
    p.add_argument("--dtype", default=None, help=EXPORT_DTYPE_HELP + "; evaluation runs in this dtype too, else in "
                   "float32")
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
    p.add_argument("--dtype", default=None, help=EXPORT_DTYPE_HELP)
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
    c = esub.add_parser("compare", help="experiments side by side, the original as reference",
                        description="Experiments side by side, each against the original of its evaluation "
                                    "setting, with paired verdicts; two IDs of one setting: the second against "
                                    "the first as well.")
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
    matching GLOB reports (e.g. ``progress:layers``, ``progress:evaluate pruned``), and
    ``progress:GLOB@N`` when it reports ``done = N`` (e.g. ``progress:cells@10``);
    ``MOESCOPE_FAULT_AT=write:GLOB`` when it opens a file whose path matches GLOB for writing
    (e.g. ``write:*/out/config.json``); ``MOESCOPE_FAULT_RANK=R`` limits it to rank R of a
    torchrun world, and ``MOESCOPE_FAULT_SIGNAL=STOP`` sends SIGSTOP instead of SIGKILL (a rank
    that hangs). It is an audit hook, so it sees every write by any module
    without a call site in the code under test."""
    import os

    spec = os.environ.get("MOESCOPE_FAULT_AT")
    if not spec:
        return
    only = os.environ.get("MOESCOPE_FAULT_RANK")  # under torchrun: only this rank (RANK) faults
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    import fnmatch
    import signal

    kind, _, pattern = spec.partition(":")
    pattern, _, at = pattern.partition("@") if kind == "progress" else (pattern, "", "")
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event: str, args: tuple) -> None:
        if kind == "progress" and event == "moescope.progress":
            hit = fnmatch.fnmatchcase(str(args[0]), pattern) and (not at or str(args[1]) == at)
        elif kind == "write" and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            hit = bool(args[2] & writing) and fnmatch.fnmatchcase(os.path.abspath(os.fsdecode(args[0])), pattern)
        else:
            return
        if hit:
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("MOESCOPE_FAULT_SIGNAL", "KILL")))

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


PARALLEL_COMMANDS = ("analyze", "grid", "plan", "eval", "prune")  # what --nproc / torchrun spread over ranks


def _take_nproc(argv: list[str]) -> tuple[list[str], int | None]:
    """``--nproc N`` (anywhere before a ``--``) is taken out before parsing: it relaunches the
    same command under torchrun with N ranks on this machine."""
    end = argv.index("--") if "--" in argv else len(argv)
    out, n, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if i < end and (a == "--nproc" or a.startswith("--nproc=")):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in a else 2
            try:
                n = int(value)
            except ValueError:
                raise MoescopeError(f"--nproc takes a number of processes (ranks), got {value!r}") from None
            if n < 1:
                raise MoescopeError(f"--nproc must be at least 1, got {n}")
            continue
        out.append(a)
        i += 1
    return out, n


# what torchrun itself writes to stderr around its workers (its log lines, the banner about threads,
# the report and Python traceback it prints when a worker fails): not shown, each rank's own
# one-line error says what happened
_TORCHRUN_NOISE = re.compile(r"^([WEI]\d{4} \d\d:\d\d|\*{5}|Setting OMP_NUM_THREADS|Traceback \(most recent|\s+\S|"
                             r"torch\.distributed\.|={5}|-{5}|moescope FAILED|Failures:|Root Cause|\[\d+\]:|<N/A>)")


def _launch_torchrun(argv: list[str], nproc: int) -> int:
    """Run ``moescope ARGV`` as ``torchrun --standalone --nproc-per-node NPROC -m moescope ARGV``.
    The ranks' stdout passes through (only the main rank writes there), and their stderr too, less
    torchrun's own report and the same error line repeated by several ranks. Returns 0, or 2 when
    a rank failed (130 on Ctrl-C)."""
    import os
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "moescope", *argv]
    env = dict(os.environ)
    # the CPU threads shared out between the ranks (torchrun would set 1 and say so)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    shown: set[bytes] = set()
    pending = b""
    try:
        while True:
            data = os.read(proc.stderr.fileno(), 65536)
            if not data:
                break
            pending += data
            # whole lines, and progress bars (they end in a carriage return) as they come
            parts = re.split(rb"(?<=[\r\n])", pending)
            pending = parts.pop() if parts and not parts[-1].endswith((b"\n", b"\r")) else b""
            for part in parts:
                text = part.decode("utf-8", "replace")
                if _TORCHRUN_NOISE.match(text) or (part in shown and text.startswith("moescope: ")):
                    continue
                shown.add(part)
                sys.stderr.write(text)
                sys.stderr.flush()
        code = proc.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its ranks
        proc.wait()
        return 130
    finally:
        proc.stderr.close()
    return 0 if code == 0 else 2


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


@contextlib.contextmanager
def _ranks(args):
    """Under torchrun: join the process group (gloo on CPUs, NCCL beside it on GPUs; each rank on
    ``cuda:LOCAL_RANK``) and leave it at the end; only the main rank writes to stdout. Yields the
    context that silences stdout on the other ranks. One process: nothing changes."""
    from moescope.analysis.core.processes import launched_by_torchrun

    if not launched_by_torchrun():  # one process: torch.distributed is never imported
        yield contextlib.nullcontext()
        return
    from moescope.analysis.core import distributed

    try:
        if _command_name(args) not in PARALLEL_COMMANDS:
            raise MoescopeError(f"'{_command_name(args)}' runs in one process, not under torchrun "
                                f"(data-parallel commands: {', '.join(PARALLEL_COMMANDS)})")
        world = distributed.init(getattr(args, "device", None))
    except MoescopeError as err:  # before any work: the one-line error and status 2 of main()
        print(f"moescope: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if hasattr(args, "device"):
        args.device = distributed.rank_device(args.device)
    import os

    if getattr(args, "offload", None):  # each rank its own folder for accelerate's offloaded tensors
        args.offload = os.path.join(args.offload, f"rank{world.rank}")

    sink = open(os.devnull, "w") if not world.is_main else None  # noqa: SIM115 - closed below
    try:
        yield contextlib.redirect_stdout(sink) if sink else contextlib.nullcontext()
    finally:
        if sink:
            sink.close()
        distributed.finish()


def _command_name(args) -> str:
    return getattr(args, "command", "") or ""


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every exception ends here: a user mistake (:class:`MoescopeError`) and any
    other exception are one line on stderr, exit status 2 (``--debug`` prints the traceback too);
    Ctrl-C exits 130, SIGTERM 143 (both after cleaning up); a closed stdout ends quietly (141)."""
    from moescope.analysis.core.processes import Terminated, launched_by_torchrun

    argv = sys.argv[1:] if argv is None else list(argv)
    argv, debug = _take_debug(argv)
    try:
        argv, nproc = _take_nproc(argv)
        if nproc is not None and _command(argv) not in PARALLEL_COMMANDS:
            raise MoescopeError(f"--nproc applies to {', '.join(PARALLEL_COMMANDS)}; "
                                f"'{_command(argv)}' runs in one process")
    except MoescopeError as err:
        print(f"moescope: error: {err}", file=sys.stderr)
        return 2
    if nproc is not None and nproc > 1 and not launched_by_torchrun():
        return _launch_torchrun(argv, nproc)
    # the registry's flags only where they are parsed: `moescope --help`, `cache ls` and the like
    # then start without importing torch
    try:
        parser = build_parser(strategy_flags=_command(argv) == "plan")
        args = parser.parse_args(argv)
    except BrokenPipeError:  # `moescope --help | head -1`
        return _stdout_gone()
    _fault_hook()
    _library_bars_off_unless_terminal()
    with _sigterm_as_interrupt(), _ranks(args) as quiet_stdout:
        try:
            with quiet_stdout:
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
