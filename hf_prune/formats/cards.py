"""The model card's "Run it" section: how to run the serving files found in a checkpoint folder (GGUF files at its
root, ONNX graphs in ``onnx/``), in the runtimes that read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def serving_section(folder: str | Path, repo_id: str, speed: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """Markdown lines for the exported files in ``folder`` (none when there are none), with ``speed``: rows of the
    exports timed against the dense model's in their runtimes."""
    folder = Path(folder)
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    onnx = folder / "onnx" / "model.onnx"
    vllm = (folder / "vllm" / "config.json").is_file()
    if not ggufs and not onnx.is_file() and not vllm:
        return []
    out = ["## Run it in a serving runtime", ""]
    if speed:
        out += [f"Measured when it was exported, against the dense model exported the same way, timed interleaved "
                f"in the runtime ({speed[0].get('threads', '?')} CPU threads):", "",
                "| format | runtime | metric | dense | pruned | speedup |", "|---|---|---|---:|---:|---:|"]
        out += [f"| {r['format']} | {r['runtime']} | {r['metric']} | {r['dense']:.1f} | {r['pruned']:.1f} | "
                f"{r['speedup']:.2f}x |" for r in speed]
        out.append("")
    if ggufs:
        first = ggufs[0]
        out += [
            f"GGUF files for llama.cpp ({', '.join(f'`{g}`' for g in ggufs)}): layers of different sizes are "
            "llama.cpp's `deci` architecture, which reads each layer's head and FFN sizes, so no custom code runs.",
            "",
            "```bash",
            f"huggingface-cli download {repo_id} {first} --local-dir .",
            f'llama-cli -m {first} -p "Hello"',
            "```",
            "",
            "llama-cpp-python:",
            "",
            "```python",
            "from llama_cpp import Llama",
            "",
            f'llm = Llama.from_pretrained(repo_id="{repo_id}", filename="{first}", flash_attn=True)',
            "```",
            "",
            f"ollama: a `Modelfile` holding `FROM ./{first}`, then `ollama create my-model -f Modelfile`.",
            "",
        ]
    if onnx.is_file():
        int8 = (folder / "onnx" / "model_int8.onnx").is_file()
        out += [
            "ONNX for onnxruntime (`onnx/model.onnx`" + (", int8: `onnx/model_int8.onnx`" if int8 else "")
            + "; dynamic batch and sequence axes):",
            "",
            "```python",
            "import onnxruntime as ort",
            "from huggingface_hub import hf_hub_download",
            "from transformers import AutoTokenizer",
            "",
            f'session = ort.InferenceSession(hf_hub_download("{repo_id}", "onnx/model.onnx"))',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            'inputs = dict(tokenizer(["Hello"], return_tensors="np"))',
            "names = [i.name for i in session.get_inputs()]",
            "outputs = session.run(None, {k: v for k, v in inputs.items() if k in names})",
            "```",
            "",
        ]
    if vllm:
        out += [
            "vLLM (`vllm/`: the DeciLM / Nemotron-NAS layout, which vLLM runs with its own implementation, each layer "
            "at its own FFN width and KV-head count; `trust_remote_code` loads only its config class):",
            "",
            "```bash",
            f'huggingface-cli download {repo_id} --include "vllm/*" --local-dir .',
            "vllm serve ./vllm --trust-remote-code",
            "```",
            "",
        ]
    return out
