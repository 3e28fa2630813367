"""`RewardEngine.score_images` against the pixel path written out: diffusers VAE encode, SD3 prompts, latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_pixel import PROMPTS, _every_input_form, _rgb

from bench.tiny_base import default_tiny_base
from kernels.noise import noise_ref


@pytest.fixture(scope="module")
def pixel_engine():
    from engine import RewardEngine

    engine = RewardEngine.from_base(default_tiny_base(), dtype=torch.float32, kernels_backend="torch")
    engine.pixel_front_end(max_sequence_length=32)  # short T5 context: the tiny encoders, faster
    return engine


def _expected_rewards(
    engine, images: list[torch.Tensor], prompts: list[str], seed: int, streams: list[int] | None = None
) -> torch.Tensor:
    """The pixel path from first principles: diffusers VAE posterior mean of 2x - 1, (z - shift) * scale, the SD3
    prompt embeddings, then the latent path with the same seed. ``images`` are [3, H, W] in [0, 1], one size;
    ``streams``: the images' positions in the `score_images` call (their noise streams), default 0, 1, ..."""
    with torch.no_grad():
        z = engine.pixel.image_encoder.vae.encode(torch.stack(images) * 2 - 1).latent_dist.mean
    embeds, pooled = engine.pixel.prompt_encoder(prompts)
    z = (z - 0.0609) * 1.5305
    if streams is None:
        return engine.score(z, (embeds, pooled), seed=seed)
    return engine.score(z, (embeds, pooled), noise=noise_ref(z.shape, seed, streams=torch.tensor(streams)))


def test_score_images_equals_vae_encode_and_score(pixel_engine, tmp_path: Path) -> None:
    arrays = [_rgb(32, 48, seed=0), _rgb(32, 48, seed=1), _rgb(32, 48, seed=2)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # a repeated prompt: encoded once, shared by two images
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    expected = _expected_rewards(pixel_engine, tensors, prompts, seed=7)
    for name, images in _every_input_form(arrays, tmp_path).items():
        rewards = pixel_engine.score_images(images, prompts, seed=7)
        assert rewards.shape == (3,) and rewards.dtype == torch.float32, name
        torch.testing.assert_close(rewards, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_score_images_resizes_and_keeps_input_order(pixel_engine) -> None:
    # 40x50 -> 48x48 (see test_resize_policy); the two 32x32 images form another size group, scored apart.
    odd, small0, small1 = _rgb(40, 50, 0), _rgb(32, 32, 1), _rgb(32, 32, 2)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    rewards = pixel_engine.score_images([small0, odd, small1], [prompts[1], prompts[0], prompts[2]], seed=3)
    x = torch.from_numpy(odd).permute(2, 0, 1).float()[None] / 255
    resized = F.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)[0]
    as_tensor = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in (small0, small1)]
    # image i of the call uses noise stream i, whichever size group it is scored in
    expected_small = _expected_rewards(pixel_engine, as_tensor, [prompts[1], prompts[2]], seed=3, streams=[0, 2])
    expected_odd = _expected_rewards(pixel_engine, [resized], [prompts[0]], seed=3, streams=[1])
    torch.testing.assert_close(rewards[[0, 2]], expected_small, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rewards[1:2], expected_odd, rtol=1e-6, atol=1e-7)
    # so an image's reward does not depend on the sizes of the other images in the call
    same_sizes = pixel_engine.score_images([small0, small0, small1], [prompts[1], prompts[0], prompts[2]], seed=3)
    torch.testing.assert_close(same_sizes[2], rewards[2], rtol=1e-5, atol=1e-6)


def test_score_images_converts_grayscale_and_rgba(pixel_engine) -> None:
    rgb = _rgb(32, 32, 4)
    reference = pixel_engine.score_images([rgb], PROMPTS[:1], seed=1)
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 128, np.uint8)], axis=2)
    assert torch.equal(pixel_engine.score_images([Image.fromarray(rgba, mode="RGBA")], PROMPTS[:1], seed=1), reference)
    gray = rgb[:, :, 1]
    assert torch.equal(
        pixel_engine.score_images([Image.fromarray(gray, mode="L")], PROMPTS[:1], seed=1),
        pixel_engine.score_images([np.repeat(gray[:, :, None], 3, axis=2)], PROMPTS[:1], seed=1),
    )


def test_score_images_bad_inputs(pixel_engine, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    image = _rgb(16, 16)
    with pytest.raises(ValueError, match="empty"):
        pixel_engine.score_images([], [])
    with pytest.raises(ValueError, match="1 images but 0 prompts"):
        pixel_engine.score_images([image], [])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        pixel_engine.score_images([image, image], ["a cat"])
    with pytest.raises(TypeError, match="one per image"):
        pixel_engine.score_images([image], "a cat")
    with pytest.raises(ValueError, match="not an image file"):
        pixel_engine.score_images([str(text)], ["a cat"])
    with pytest.raises(ValueError, match="max_side=512"):  # tiny: 32 positions x patch 2 x VAE 8 = 512 px
        pixel_engine.score_images([_rgb(600, 64)], ["a cat"])
    assert pixel_engine.score_images([_rgb(600, 64)], ["a cat"], max_side=512).shape == (1,)
    with pytest.raises(TypeError, match="seed"):
        pixel_engine.score_images([image], ["a cat"], seed="0")
    from engine import RewardEngine

    no_base = RewardEngine.from_preset("tiny", dtype=torch.float32, kernels_backend="torch")
    with pytest.raises(ValueError, match="score_images needs"):
        no_base.score_images([image], ["a cat"])
