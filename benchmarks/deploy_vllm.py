"""bench_deploy's vLLM part: SmolLM2 dense and pruned in vLLM, each the way vLLM can load it.

- ``dense``: the original checkpoint (vLLM's own Llama implementation);
- ``uniform 80%``: a uniform one-shot cut exported with ``save_stock`` (vLLM's own Llama);
- ``rf X%, checkpoint``: an uneven retraining-free cut as the hf_prune checkpoint (``trust_remote_code``: vLLM's
  Transformers-backend fallback runs its modeling file);
- ``rf X%, DeciLM``: the same cut exported with ``--format vllm`` (vLLM's own DeciLM implementation, per-layer FFN
  widths and KV heads; query heads padded back to full width with zero heads).

Per model: held-out perplexity computed by vLLM (fp32, from prompt log-probabilities) beside transformers', greedy
agreement with transformers (fp32), and generation throughput (tokens/s of 64-token greedy generations, batch 1 and
16) in bf16 (timed over rounds) and fp32 (timed once, on the engine that checked it). vLLM builds one engine per model (tens of seconds), so models cannot be interleaved call by
call: they are timed in rounds, each round loading every model once, the order reversed from round to round.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import hf_prune as hp
from hf_prune.formats import export_model
from hf_prune.formats.runtimes import vllm_engine


def files(models: dict[str, torch.nn.Module], tok: Any, dense_path: str, out: Path) -> dict[str, tuple[Path, str]]:
    """``{row name: (folder, how vLLM runs it)}`` for the dense model and every cut."""
    rows = {"dense": (Path(dense_path), "Llama (vLLM's own)")}
    for name, model in models.items():
        if name == "dense":
            continue
        if name.startswith("uniform"):
            rows[name] = (export_model(model, tok, out / name.replace(" ", "_"), "stock"), "Llama (vLLM's own), stock")
            continue
        ckpt = out / f"{name.replace(' ', '_').replace('%', '')}-ckpt"
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        rows[f"{name}, checkpoint"] = (ckpt, "Transformers backend (remote code)")
        rows[f"{name}, DeciLM"] = (export_model(model, tok, out / f"{ckpt.name}-decilm", "vllm"),
                                   "DeciLM (vLLM's own)")
    return rows


def _generate_tok_s(llm: Any, prompts: list[list[int]], new_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / seconds


def _perplexity_and_greedy(llm: Any, blocks: list[list[int]], prompts: list[list[int]]) -> tuple[float, list]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": b} for b in blocks],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll = -sum(o.prompt_logprobs[i][b[i]].logprob for o, b in zip(outs, blocks) for i in range(1, len(b)))
    count = sum(len(b) - 1 for b in blocks)
    greedy = llm.generate([{"prompt_token_ids": p} for p in prompts],
                          SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    return math.exp(nll / count), [list(o.outputs[0].token_ids) for o in greedy]


def _torch_greedy(model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(torch.tensor(prompts), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    return out[:, len(prompts[0]):].tolist()


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of generated positions before which the two greedy continuations still agree (first divergence)."""
    same = 0
    for x, y in zip(a, b):
        same += next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
    return same / sum(len(x) for x in a)


def measure(models: dict[str, torch.nn.Module], tok: Any, dense_path: str, held_out: list[dict], rounds: int,
            repeats: int, threads: int, out: Path) -> list[dict[str, Any]]:
    from hf_prune.lm import perplexity

    # vLLM's CPU worker otherwise keeps one of the cores for the engine and computes on the rest (measured by hand on
    # 2 cores: dense bf16 batch 16 at 24 tok/s that way, 43 with both cores bound to the worker)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    blocks = [row.tolist() for b in held_out for row in b["input_ids"]]
    prompts = [b[:32] for b in blocks[:16]]
    folders = files(models, tok, dense_path, out)
    torch_ppl = {n: perplexity(m, held_out) for n, m in models.items()}
    dense_params = hp.count_params(models["dense"])
    dense_flops = hp.count_flops(models["dense"], 128)["total"]
    rows = {}
    for name, (folder, how) in folders.items():
        source = models[name.split(",")[0]]
        llm = vllm_engine(folder, dtype="float32", max_model_len=256)
        ppl, greedy = _perplexity_and_greedy(llm, blocks, prompts[:4])
        fp32 = {f"float32_b{bs}": [_generate_tok_s(llm, prompts[:bs], 64) for _ in range(repeats)] for bs in (1, 16)}
        del llm
        gc.collect()
        weights = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
        rows[name] = {"model": name, "runs_as": how, "ppl_vllm": ppl, "ppl_torch": torch_ppl[name.split(",")[0]],
                      "greedy_agreement": _agreement(greedy, _torch_greedy(source, prompts[:4])),
                      "params_ideal": dense_params / hp.count_params(source),
                      "flops_ideal": dense_flops / hp.count_flops(source, 128)["total"], "weights_mb": weights / 2**20,
                      "tok_s": fp32}
        print(f"  {name:<24} ppl vLLM {ppl:.3f} (torch {rows[name]['ppl_torch']:.3f}), greedy agreement "
              f"{rows[name]['greedy_agreement']:.0%}", flush=True)
    names = list(folders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            llm = vllm_engine(folders[name][0], dtype="bfloat16", max_model_len=256)
            _generate_tok_s(llm, prompts[:1], 8)  # warm-up
            for bs in (1, 16):
                runs = rows[name]["tok_s"].setdefault(f"bfloat16_b{bs}", [])
                runs += [_generate_tok_s(llm, prompts[:bs], 64) for _ in range(repeats)]
            del llm
            gc.collect()
            print(f"  round {r + 1}: {name} timed", flush=True)
    out_rows = []
    for name in names:
        row = rows[name]
        for key, runs in row.pop("tok_s").items():
            row[f"{key}_tok_s"] = statistics.median(runs)
            row[f"{key}_runs"] = runs
        out_rows.append(row)
    dense = out_rows[0]
    for row in out_rows:
        for key in ("bfloat16_b1", "bfloat16_b16", "float32_b1", "float32_b16"):
            row[f"{key}_speedup"] = row[f"{key}_tok_s"] / dense[f"{key}_tok_s"]
    return out_rows
