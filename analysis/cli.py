"""``moescope`` command line: parse, validate, make one library call, print.

Every user mistake surfaces as a :class:`~analysis.errors.MoescopeError` and is printed as one
line (``moescope: error: ...``, exit status 2); Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import sys

from analysis.errors import MoescopeError


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} PiB"


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def format_info(info: dict) -> str:
    counts = sorted(set(info["num_experts"].values()))
    experts = (
        f"{counts[0]} per MoE layer"
        if len(counts) == 1
        else ", ".join(f"layer {k}: {v}" for k, v in info["num_experts"].items())
    )
    p = info["params"]
    shared = (
        ", ".join(
            f"layer {s['layer']}: {_human(s['params'])} params{' (sigmoid-gated)' if s['gated'] else ''}"
            for s in info["shared_experts"]
        )
        or "none"
    )
    lines = [
        f"{info['source']}  ({info['family']}, {', '.join(info['architectures']) or info['model_type']})",
        f"decoder layers   {info['num_hidden_layers']} (MoE: {_ranges(info['moe_layers'])}; dense: "
        f"{_ranges(info['dense_layers'])})",
        f"routed experts   {experts}, top-{info['top_k']}",
        f"routing          {info['routing']}"
        + (f" ({info['routing_groups']} routing groups)" if info.get("routing_groups") else ""),
        f"shared experts   {shared}",
        f"parameters       total {_human(p['total'])} · routed experts {_human(p['experts'])} "
        f"({100 * p['experts'] / p['total']:.1f}%) · active per token {_human(p['active'])}",
        "weights          " + ", ".join(f"{k} {_bytes(v)}" for k, v in info["bytes"].items()),
    ]
    return "\n".join(lines)


def cmd_info(args) -> int:
    from analysis.models import load_moe

    model = load_moe(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code, weights=False)
    info = model.info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_dashboard(args) -> int:
    """Start the Streamlit dashboard (bound to localhost unless --address says otherwise)."""
    import os
    from pathlib import Path

    from analysis.models import REPO_ROOT

    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    app = REPO_ROOT / "dashboard" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.address,
           "--server.port", str(args.port), "--", "--model", model]
    os.chdir(REPO_ROOT)  # so .streamlit/config.toml (theme, localhost binding) applies
    os.execv(sys.executable, cmd)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moescope",
        description="Find, drop and merge redundant experts in Mixture-of-Experts language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("model", nargs="?", default="demo", metavar="MODEL",
                       help="'demo' (default), a local model folder, or a hub id")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow custom modelling code from the model's repository (off by default)")
        return p

    p = model_command("info", "Show a model's MoE structure: layers, experts, routing, parameter counts.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--dtype", default=None, help="report bytes for this dtype (default: the checkpoint's)")
    p.set_defaults(func=cmd_info)

    p = model_command("dashboard", "Open the dashboard in the browser (Streamlit).")
    p.add_argument("--address", default="localhost", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoescopeError as err:
        print(f"moescope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moescope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
