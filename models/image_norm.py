"""The per-channel normalisation the Stage1 encoder was trained with (ImageNet statistics).

Its own small module, free of heavy imports, so that image-decoding worker processes
(data_prep/images.py) can read it without importing torch or transformers.
"""

IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
