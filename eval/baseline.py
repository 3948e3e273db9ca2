"""The pretrained text-only baseline: the base LM with no adapter and no image.

It answers the task's prompt built with `with_image=False` (for task B: the image type as text,
nothing else), as the spec's `inference_simple_pretrained.py` does. It is generated through the
same batched path as the Stage2 models (`eval.generate`), so the only differences measured are the
adapter and the image prefix.

    python -m eval.generate --model pretrained --base-model-path /models/mistral-7b --shard-dir shards
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.cond_names import default_cond_name_to_id
from eval.modeling import EvalModel, resolve_device, resolve_dtype

PRETRAINED_NAME = "pretrained"


def load_pretrained_model(model_path: str, device: str = "auto", dtype: str = "auto",
                          name: str = PRETRAINED_NAME) -> EvalModel:
    """The plain HF causal LM and its tokenizer from a local model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'}: missing; --base-model-path must be a local "
                                "HF model directory (config, weights, tokenizer)")
    if (path / "adapter_config.json").exists():
        raise ValueError(f"{path}: holds a PEFT adapter; the pretrained baseline needs the base model "
                         f"(see base_model_name_or_path in {path / 'adapter_config.json'})")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return EvalModel(name=name, lm=lm, tokenizer=tokenizer, prefix_lm=None,
                     cond_map=default_cond_name_to_id(), num_image_tokens=0,
                     train_config={"base_model_path": str(path)}, source=str(path))


def describe_baseline(model: EvalModel) -> str:
    return json.dumps({"name": model.name, "source": model.source, "adapter": False, "image": False})


def main(argv=None) -> None:
    """`python -m eval.baseline ...` == `python -m eval.generate --model pretrained ...`."""
    import sys

    from eval.generate import main as generate_main

    args = list(sys.argv[1:] if argv is None else argv)
    generate_main(["--model", "pretrained", "--model-name", PRETRAINED_NAME, *args])


if __name__ == "__main__":
    main()
