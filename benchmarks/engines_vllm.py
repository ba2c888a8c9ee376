"""The vLLM side of ``benchmarks/engines.py``: run in vLLM's own Python (its environment pins its
own transformers), one engine at a time in this one process, on a job file written by the parent.

    python engines_vllm.py JOB.json RESULT.json

JOB: {"exports": [{"name", "path", "prompts": [[token ids]], "new_tokens"}], "logprobs": K,
"speed": {"names": [...], "new_tokens": N, "repeats": R} or null}. RESULT, per export: greedy
tokens and the top-K log-probabilities of every generated step per prompt, the model's weight
bytes as vLLM holds them (parameters and buffers), the engine's start time, or the one-line error
vLLM stopped with; and, for the speed names, decode tokens/s measured in alternating repeats.
Imports only vLLM (moescope's plugin is loaded by vLLM itself, through its entry point).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: starts in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models need little
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # a shared machine: do not pin cores


def engine(path: str, dtype: str = "float32"):
    from vllm import LLM

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        positions = json.load(f).get("max_position_embeddings") or 256
    return LLM(path, enforce_eager=True, max_model_len=min(256, positions), dtype=dtype, max_num_seqs=4, seed=0,
               skip_tokenizer_init=True, enable_prefix_caching=False)


def weight_bytes(llm) -> tuple[int, int]:
    """(bytes of the tensors the model holds, of which buffers) as vLLM holds them after its own
    processing: parameters, buffers and tensors kept as plain attributes (vLLM's MLA keeps its
    absorbed projections so), each storage counted once; never the KV cache."""
    def count(model):
        import torch

        seen, total, buffers = set(), 0, 0
        for module in model.modules():
            tensors = [(t, False) for t in module._parameters.values() if t is not None]
            tensors += [(t, True) for t in module._buffers.values() if t is not None]
            tensors += [(t, False) for k, t in vars(module).items()
                        if isinstance(t, torch.Tensor) and "cache" not in k]  # not the KV cache
            for t, is_buffer in tensors:
                key = t.untyped_storage().data_ptr()
                if key in seen:
                    continue
                seen.add(key)
                n = t.untyped_storage().nbytes()
                total += n
                buffers += n if is_buffer else 0
        return total, buffers

    (total, buffers), = llm.apply_model(count)
    return int(total), int(buffers)


def generate(llm, prompts, new_tokens: int, logprobs: int):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, logprobs=logprobs, detokenize=False,
                            ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        steps = [{str(t): lp.logprob for t, lp in step.items()} for step in (c.logprobs or [])]
        result.append({"tokens": list(c.token_ids), "logprobs": steps})
    return result


def decode_rate(llm, prompt, new_tokens: int) -> float:
    """Decode tokens/s of one sequence: (N - 1) tokens over the time a run of N tokens takes beyond
    a run of 1 token (the prefill)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def run(n):
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                     SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False), use_tqdm=False)
        return time.perf_counter() - t

    return (new_tokens - 1) / max(run(new_tokens) - run(1), 1e-9)


def one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[-1] if text else type(err).__name__


def main(job_path: str, out_path: str) -> int:
    job = json.loads(open(job_path, encoding="utf-8").read())
    results = {}
    for ex in job["exports"]:
        name = ex["name"]
        print(f"vllm: {name}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        llm = None
        try:
            llm = engine(ex["path"], ex.get("dtype", "float32"))
            start = time.perf_counter() - t
            gen = generate(llm, ex["prompts"], ex["new_tokens"], job.get("logprobs", 5))
            params, buffers = weight_bytes(llm)
            results[name] = {"start_s": start, "weight_bytes": params, "buffer_bytes": buffers, "outputs": gen}
        except Exception as err:  # the table shows what vLLM said, then the next export runs
            results[name] = {"error": one_line(err)}
        del llm
        gc.collect()
    speed = job.get("speed") or {}
    if speed.get("names"):
        # vLLM keeps one engine per process (a second one tears down the first's process groups), so the
        # exports take turns: each repeat starts every engine again, warms it up and measures it
        paths = {ex["name"]: ex for ex in job["exports"]}
        prompt = job["exports"][0]["prompts"][0]
        try:
            for _ in range(speed.get("repeats", 3)):
                for n in speed["names"]:
                    print(f"vllm: speed {n}", file=sys.stderr, flush=True)
                    llm = engine(paths[n]["path"], paths[n].get("dtype", "float32"))
                    decode_rate(llm, prompt, 4)  # warm-up
                    results[n].setdefault("decode_tokens_per_s", []).append(
                        decode_rate(llm, prompt, speed.get("new_tokens", 64)))
                    del llm
                    gc.collect()
        except Exception as err:
            results["speed_error"] = one_line(err)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
