"""bench_deploy's llama.cpp part: dense and pruned decoders as GGUF files, measured in llama.cpp itself.

For each model (dense, retraining-free uneven cuts, a uniform cut) and outtype: the file's size, held-out perplexity
computed by llama.cpp (flash attention, f16 KV cache: how it serves) beside transformers' fp32 perplexity of the
same model on the same blocks, prompt processing of a 128-token prompt and decode at batch 1 (tokens/s; all files
interleaved run by run, median), and the same model's PyTorch eager prefill/decode beside it.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers as T
from common import CACHE

import hf_prune as hp
from hf_prune.formats import save_gguf
from hf_prune.formats.runtimes import llama_perplexity, llama_timing, load_llama
from hf_prune.lm import perplexity
from hf_prune.resources import embedded_model_path

CUTS = CACHE / "deploy" / "cuts"


def cut_model(name: str, dense: torch.nn.Module, method: str, budget: float, calib: list[dict], seed: int = 0):
    """The cut (cached as a checkpoint: retraining-free refits weights, so its plan alone does not replay it)."""
    n = sum(b["input_ids"].shape[0] for b in calib)
    folder = CUTS / f"{name}-{method}-{budget:g}-calib{n}"
    if (folder / "config.json").exists():
        return hp.load_pruned(folder).eval(), None
    if method == "retraining_free":
        cfg = hp.PruningConfig(method="retraining_free", flops_keep=budget, tuning_samples=n // 2,
                               selection_samples=n // 2, progress=False, seed=seed)
    elif method == "uniform":  # one-shot Fisher, every layer the same shape: the stock-expressible cut
        cfg = hp.PruningConfig(importance="fisher", allocation="uniform", flops_keep=budget, progress=False)
    else:
        raise ValueError(f"unknown cut {method!r}")
    start = time.perf_counter()
    model, _ = hp.prune(copy.deepcopy(dense).requires_grad_(True), calib, cfg)
    seconds = time.perf_counter() - start
    model.save_pretrained(folder)
    return model.eval(), seconds


def _pp_and_decode(llm: Any, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prompt seconds, decode seconds per token) of one run from an empty cache."""
    prompt_s, decode_s = llama_timing(llm, prompt, new_tokens)
    return prompt_s, decode_s / new_tokens


def measure(models: dict[str, torch.nn.Module], tok: Any, held_out: list[dict], outtypes: list[str],
            unpadded: list[str], repeats: int, threads: int, out_dir: Path) -> list[dict[str, Any]]:
    """One row per (model, outtype): sizes, perplexities and speeds; every file timed interleaved with the rest."""
    blocks = [row.tolist() for b in held_out for row in b["input_ids"]]
    prompt = blocks[0][:128]
    rows, llms = [], {}
    dense = models["dense"]
    dense_flops = hp.count_flops(dense, 128)["total"]
    torch_ppl = {name: perplexity(m, held_out) for name, m in models.items()}
    for name, model in models.items():
        sizes = hp.PrunePlan.of(model).physical_sizes()
        flops_kept = hp.count_flops(model, 128)["total"] / dense_flops
        for outtype in outtypes:
            for pad in ([32, 1] if name in unpadded else [32]):
                label = name if pad == 32 else f"{name} (unpadded)"
                path = save_gguf(model, tok, out_dir / f"{label.replace(' ', '_')}-{outtype}.gguf", outtype=outtype,
                                 pad_ffn_to=pad, overwrite=True)
                llm = load_llama(path, n_ctx=128, threads=threads, logits_all=True)
                ppl = llama_perplexity(llm, blocks)
                del llm
                llms[(label, outtype)] = load_llama(path, n_ctx=256, threads=threads, logits_all=False)
                rows.append({"model": label, "outtype": outtype, "file_mb": path.stat().st_size / 2**20,
                             "ppl_llama_cpp": ppl, "ppl_torch": torch_ppl[name],
                             "ppl_vs_torch": ppl / torch_ppl[name] - 1, "ppl_vs_dense": ppl / torch_ppl["dense"],
                             "flops_kept": flops_kept,
                             "layers": len(sizes), "heads": sum(s["num_heads"] for s in sizes),
                             "ffn": sum(s["intermediate_size"] for s in sizes)})
                print(f"  {label:<28} {outtype:<7} {rows[-1]['file_mb']:7.1f} MiB  ppl {ppl:.3f} (torch "
                      f"{torch_ppl[name]:.3f})", flush=True)
    runs: dict[tuple, list] = {k: [] for k in llms}
    for _ in range(repeats + 1):  # the first round warms up
        for key, llm in llms.items():
            runs[key].append(_pp_and_decode(llm, prompt, 32))
    for row in rows:
        timing = runs[(row["model"], row["outtype"])][1:]
        row["prompt_tok_s"] = 128 / statistics.median(p for p, _ in timing)
        row["decode_tok_s"] = 1 / statistics.median(d for _, d in timing)
    by_key = {(r["model"], r["outtype"]): r for r in rows}
    for row in rows:
        base = by_key[("dense", row["outtype"])]
        row["bytes_ideal"] = base["file_mb"] / row["file_mb"]
        row["flops_ideal"] = 1 / row["flops_kept"]
        row["prompt_speedup"] = row["prompt_tok_s"] / base["prompt_tok_s"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["prompt_of_ideal"] = row["prompt_speedup"] / row["flops_ideal"]
        row["decode_of_ideal"] = row["decode_speedup"] / row["bytes_ideal"]
    eager = hp.compare_decode(models, prompt_len=128, new_tokens=32, repeats=repeats)
    for row in rows:
        e = eager[row["model"].removesuffix(" (unpadded)")]
        d = eager["dense"]
        row["torch_prefill_speedup"] = d.prefill_ms / e.prefill_ms
        row["torch_decode_speedup"] = d.decode_ms_per_token / e.decode_ms_per_token
        row["torch_decode_tok_s"] = 1000 / e.decode_ms_per_token
    return rows


def load(name: str) -> tuple[torch.nn.Module, Any]:
    path = embedded_model_path(name)
    return T.AutoModelForCausalLM.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)
