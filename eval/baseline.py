"""The pretrained text-only baseline: the base LM with no adapter and no image.

It answers the task's prompt built with `with_image=False` (for task B: the image type as text,
nothing else): the input a Stage2 model gets, less the image. It is generated through the same
batched path as the Stage2 models (`eval.generate`, model loading in
`eval.modeling.load_pretrained_model`), so the only differences measured are the adapter and the
image prefix.

    python -m eval.baseline --base-model-path /models/mistral-7b --shard-dir shards
    # the same as: python -m eval.generate --model pretrained --base-model-path ... --shard-dir shards
"""

from __future__ import annotations

import sys

from eval.generate import main as generate_main
from eval.modeling import PRETRAINED_NAME


def main(argv=None) -> None:
    """`python -m eval.baseline ...` == `python -m eval.generate --model pretrained ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    generate_main(["--model", "pretrained", "--model-name", PRETRAINED_NAME, *args])


if __name__ == "__main__":
    main()
