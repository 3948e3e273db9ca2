"""Tiny Stage1 models (MAE ViT encoder + EfficientNet classifier) of the real architectures, written
as checkpoint files that load exactly like real ones, for the demo and the tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import EfficientNetConfig, ViTMAEConfig

from common.io import atomic_write_bytes
from data_prep.images import decode_image
from data_prep.synthetic import EXTENTS, REGIONS, STRENGTHS, random_gif
from models.stage1 import NUM_STAGE1_CLASSES, Stage1Classifier, Stage1Encoder, vit_config, vit_config_dict

TINY_ENCODER_FILENAME = "tiny_stage1_encoder.pt"
TINY_CLASSIFIER_FILENAME = "tiny_stage1_classifier.pt"


def tiny_encoder_config(image_size: int = 32) -> ViTMAEConfig:
    # One 64-wide head (ViT-B's head width), so that even a bare state dict, whose head count is
    # inferred as hidden/64, reloads to the same function.
    return vit_config({}, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
                                patch_size=8, image_size=image_size, layer_norm_eps=1e-6), hf_names=False)


def tiny_classifier_config(image_size: int = 32) -> EfficientNetConfig:
    # width 0.025 makes the 1280-channel head 32 wide; every other layer rounds to 8 channels.
    return EfficientNetConfig(image_size=image_size, width_coefficient=0.025, depth_coefficient=1.0,
                              kernel_sizes=[3, 3], in_channels=[32, 16], out_channels=[16, 24], strides=[1, 2],
                              num_block_repeats=[1, 2], expand_ratios=[1, 6], hidden_dim=32, dropout_rate=0.0,
                              drop_connect_rate=0.0, num_labels=NUM_STAGE1_CLASSES)


def _lively_init(model: nn.Module) -> None:
    """He-style init so a random tiny CNN's logits depend visibly on the image (HF's init is ~0.02 std)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.5)


def save_tiny_stage1(out_dir: str | Path, image_size: int = 32, seed: int = 0,
                     encoder_pretrain_steps: int = 300) -> tuple[Path, Path]:
    """Write a tiny MAE ViT and a tiny random EfficientNet as {"config", "state_dict"} checkpoint files.

    The encoder is briefly pre-trained (`pretrain_tiny_encoder`, `encoder_pretrain_steps`;
    0 = random) so that its latent describes the synthetic images, as a real Stage1 encoder's does.
    Deterministic for given arguments on one machine. The encoder is stored under official-MAE names,
    like a real MAE training checkpoint. Returns (encoder, classifier).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Stage1Encoder(tiny_encoder_config(image_size))
        classifier = Stage1Classifier(tiny_classifier_config(image_size))
        _lively_init(classifier.model)
        if encoder_pretrain_steps > 0:
            pretrain_tiny_encoder(encoder, steps=encoder_pretrain_steps, seed=seed)
    paths = out_dir / TINY_ENCODER_FILENAME, out_dir / TINY_CLASSIFIER_FILENAME
    payloads = ({"config": vit_config_dict(encoder.config), "state_dict": encoder.canonical_state_dict()},
                {"config": classifier.config_dict(), "state_dict": classifier.model.state_dict()})
    for path, payload in zip(paths, payloads):
        payload["state_dict"] = {k: v.detach().clone().contiguous() for k, v in payload["state_dict"].items()}
        buffer = io.BytesIO()  # not the temp file: torch.save names the archive after it
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    return paths


def pretrain_tiny_encoder(encoder, steps: int = 300, num_images: int = 512, batch_size: int = 64,
                          lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Teach a tiny random MAE ViT to carry what the synthetic images show in its pooled latent.

    A real Stage1 encoder is trained and its latent describes the image; a random tiny one maps every
    synthetic image to nearly the same mean-pooled latent (position embeddings dominate), so a
    prefix-LM trained on it could hardly use the image. Here linear heads on the pooled latent learn
    the factors the texts mention (region, strength, extent of the drawn field) and the 4x4
    average-pooled image (its coarse layout), on synthetic images of random factors. A few seconds
    on one CPU thread; deterministic for `seed`. The encoder is left frozen. Returns the loss per step.
    """
    size = encoder.config.image_size
    rng = np.random.default_rng(seed)
    pixels, factors = [], []
    for _ in range(num_images):
        gif, f = random_gif(rng, 2 * size)
        pixels.append(decode_image(gif, size))
        factors.append(f)
    images = torch.from_numpy(np.stack(pixels))
    labels = {k: torch.tensor([f[k] for f in factors]) for k in ("region", "strength", "extent")}
    layout = F.adaptive_avg_pool2d(images, 4).flatten(1)
    sizes = {"region": len(REGIONS), "strength": len(STRENGTHS), "extent": len(EXTENTS)}
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(encoder.latent_dim, n) for k, n in sizes.items()})
    heads["layout"] = torch.nn.Linear(encoder.latent_dim, layout.shape[1])
    encoder.requires_grad_(True)  # Stage1 modules are built frozen
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(num_images, (batch_size,), generator=gen)
        latent, _ = encoder.encode_with_grad(images[idx])
        loss = F.mse_loss(heads["layout"](latent), layout[idx])
        loss = loss + sum(F.cross_entropy(heads[k](latent), labels[k][idx]) for k in sizes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    encoder.requires_grad_(False)
    return losses
