"""The pixel front end against diffusers: SD3 prompt embeddings, VAE latents, the prompt cache, input handling."""

from __future__ import annotations

import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.tiny_base import make_tiny_base
from engine.pixel import ImageEncoder, PixelFrontEnd, PromptEncoder, load_images
from engine.pixel.common import progress_bar as _progress

PROMPTS = ["a photo of a cat", "two dogs running on the beach at sunset, oil painting", "zebra! 42"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base") / "base", seed=0)


@pytest.fixture(scope="session")
def pipe(tiny_dir: Path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def front(tiny_dir: Path) -> PixelFrontEnd:
    return PixelFrontEnd.from_pretrained(tiny_dir, device="cpu", max_sequence_length=32)


@pytest.fixture(scope="session")
def vae(front: PixelFrontEnd):
    """The front end's own VAE module: references below recompute the formula with diffusers calls on it.

    Not the pipeline's copy: two loads of the same weights can differ in the last bit on CPU (oneDNN picks kernels
    by buffer alignment, and safetensors mmaps at arbitrary offsets); `test_loaded_weights_equal_the_pipeline`
    checks that the weights themselves are bit-identical.
    """
    return front.image_encoder.vae


@pytest.fixture
def encoder(tiny_dir: Path) -> PromptEncoder:
    return PromptEncoder.from_pretrained(tiny_dir, device="cpu", max_sequence_length=32)


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _expected_latents(vae, images: list[np.ndarray]) -> torch.Tensor:
    """SD3 latents computed from first principles: [0,1] -> [-1,1] -> posterior mean -> (z - 0.0609) * 1.5305."""
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in images])
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean
    return (z - 0.0609) * 1.5305


# ------------------------------------------------------------------------------------------------- prompts


def test_loaded_weights_equal_the_pipeline(pipe, front: PixelFrontEnd) -> None:
    pairs = [(pipe.vae, front.image_encoder.vae)]
    pairs += [
        (getattr(pipe, n), getattr(front.prompt_encoder, n))
        for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
    ]
    for ref, ours in pairs:
        ref_state, our_state = ref.state_dict(), ours.state_dict()
        assert ref_state.keys() == our_state.keys()
        assert all(torch.equal(ref_state[k], our_state[k]) for k in ref_state)


@pytest.mark.parametrize("max_sequence_length", [128, 256])
def test_prompt_parity_with_pipeline(pipe, max_sequence_length: int) -> None:
    # The pipeline's __call__ runs encode_prompt under no_grad; T5 takes other CPU kernels with grad enabled
    # (~4e-6 apart), so the reference is taken the way the pipeline itself takes it. The encoder shares the
    # pipeline's modules (see the `vae` fixture for why); from_pretrained's weights are checked above.
    with torch.no_grad():
        ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
            PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
    encoder = PromptEncoder(
        (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3),
        (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3),
        device="cpu", max_sequence_length=max_sequence_length,
    )  # fmt: skip
    embeds, pooled = encoder(PROMPTS)
    assert embeds.shape == (3, 77 + max_sequence_length, 96) and pooled.shape == (3, 80)
    assert torch.equal(embeds, ref_embeds) and torch.equal(pooled, ref_pooled)
    # Served again from the cache: bit-identical.
    again = encoder(PROMPTS)
    assert torch.equal(again[0], ref_embeds) and torch.equal(again[1], ref_pooled)
    assert (encoder.misses, encoder.hits) == (3, 3)


def test_cache_counts_and_encodes_only_misses(encoder: PromptEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    first = encoder(PROMPTS[:2])
    encoded: list[list[str]] = []
    real_encode = encoder._encode
    monkeypatch.setattr(
        encoder, "_encode", lambda prompts, length: encoded.append(prompts) or real_encode(prompts, length)
    )
    embeds, pooled = encoder([PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[2]])
    assert encoded == [[PROMPTS[2]]]  # only the miss, once although requested twice
    assert (encoder.misses, encoder.hits) == (3, 3)
    assert torch.equal(embeds[0], first[0][1]) and torch.equal(embeds[2], first[0][0])
    assert torch.equal(embeds[1], embeds[3]) and torch.equal(pooled[1], pooled[3])
    # The key includes max_sequence_length: another length is a new entry with its own shape.
    assert encoder(PROMPTS[0], max_sequence_length=8)[0].shape == (1, 77 + 8, 96)
    assert encoded[-1] == [PROMPTS[0]] and len(encoder) == 4


def test_cache_is_bounded_in_bytes_and_lru(tiny_dir: Path) -> None:
    probe = PromptEncoder.from_pretrained(tiny_dir, device="cpu", max_sequence_length=32)
    embeds, pooled = probe(PROMPTS[0])
    entry = embeds[0].nbytes + pooled[0].nbytes
    encoder = PromptEncoder.from_pretrained(
        tiny_dir, device="cpu", max_sequence_length=32, cache_bytes=int(2.5 * entry)
    )
    encoder(PROMPTS[0])
    encoder(PROMPTS[1])
    encoder(PROMPTS[0])  # touch: PROMPTS[1] is now the least recently used
    encoder(PROMPTS[2])
    assert len(encoder) == 2 and encoder.cached_bytes == 2 * entry <= encoder.cache_bytes
    misses = encoder.misses
    encoder([PROMPTS[0], PROMPTS[2]])
    assert encoder.misses == misses
    encoder(PROMPTS[1])  # evicted earlier
    assert encoder.misses == misses + 1
    disabled = PromptEncoder.from_pretrained(tiny_dir, device="cpu", max_sequence_length=32, cache_bytes=0)
    disabled(PROMPTS)
    assert len(disabled) == 0 and disabled.cached_bytes == 0


def _held_bytes(encoder: PromptEncoder) -> int:
    return sum(t.nbytes for entry in encoder._cache.values() for t in entry)


def _slow_counting_encode(encoder: PromptEncoder, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every prompt the text encoders see; each batch takes 0.2 s so that concurrent calls overlap."""
    encoded: list[str] = []
    real_encode = encoder._encode

    def encode(prompts: list[str], length: int):
        encoded.extend(prompts)
        time.sleep(0.2)
        return real_encode(prompts, length)

    monkeypatch.setattr(encoder, "_encode", encode)
    return encoded


def test_cache_is_thread_safe_under_flow_grpo_executor(encoder: PromptEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flow-GRPO's pattern: reward fns called from a ThreadPoolExecutor(max_workers=8), batches in flight at once.
    8 concurrent calls on the same 4 new prompts encode each prompt once; the byte count equals what is held."""
    reference = encoder(PROMPTS + ["a fourth prompt"])
    encoder.clear_cache()
    encoder.hits = encoder.misses = 0
    encoded = _slow_counting_encode(encoder, monkeypatch)
    prompts = [*PROMPTS, "a fourth prompt"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: encoder(prompts), range(8)))
    assert encoded == prompts  # one encode per prompt (one batch, as for the reference), not one per thread
    assert (encoder.misses, encoder.hits) == (4, 28)
    assert encoder.cached_bytes == _held_bytes(encoder) == reference[0].nbytes + reference[1].nbytes
    for embeds, pooled in results:  # the same encoder batch as the reference: bit-identical
        assert torch.equal(embeds, reference[0]) and torch.equal(pooled, reference[1])


def test_cache_bytes_stay_exact_under_concurrent_eviction(tiny_dir: Path) -> None:
    probe = PromptEncoder.from_pretrained(tiny_dir, device="cpu", max_sequence_length=16)
    entry = sum(t[0].nbytes for t in probe("x"))
    encoder = PromptEncoder.from_pretrained(tiny_dir, device="cpu", max_sequence_length=16, cache_bytes=5 * entry)
    prompts = [f"prompt {i}" for i in range(12)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: encoder([prompts[(i + j) % 12] for j in range(3)]), range(48)))
    assert encoder.cached_bytes == _held_bytes(encoder) == 5 * entry
    assert encoder.hits + encoder.misses == 48 * 3 and not encoder._in_flight


def test_encoding_error_reaches_every_waiting_thread(encoder: PromptEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(prompts: list[str], length: int):
        time.sleep(0.2)
        raise RuntimeError("encoder out of memory")

    monkeypatch.setattr(encoder, "_encode", fail)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(encoder, PROMPTS) for _ in range(4)]
        for future in futures:
            with pytest.raises(RuntimeError, match="encoder out of memory"):
                future.result(timeout=30)
    assert not encoder._in_flight and len(encoder) == 0


def test_release_encoders(encoder: PromptEncoder) -> None:
    cached = encoder(PROMPTS[:2])
    t5 = weakref.ref(encoder.text_encoder_3)
    encoder.release_encoders()
    assert encoder.encoders_released
    assert encoder.text_encoder is None and encoder.text_encoder_2 is None and encoder.text_encoder_3 is None
    assert t5() is None  # the parameters are actually freed, not just unreferenced by us
    assert torch.equal(encoder(PROMPTS[1])[0][0], cached[0][1])
    with pytest.raises(RuntimeError, match="released"):
        encoder(PROMPTS[2])


def test_prompt_dtype_and_bad_prompts(tiny_dir: Path, encoder: PromptEncoder) -> None:
    bf16 = PromptEncoder.from_pretrained(tiny_dir, device="cpu", dtype=torch.bfloat16, max_sequence_length=16)
    embeds, pooled = bf16(PROMPTS[0])
    assert embeds.dtype == pooled.dtype == torch.bfloat16
    assert bf16.text_encoder_3.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="empty"):
        encoder([])
    with pytest.raises(TypeError, match="strings"):
        encoder(["ok", 3])
    with pytest.raises(ValueError, match="max_sequence_length"):
        encoder("a cat", max_sequence_length=0)


# -------------------------------------------------------------------------------------------------- images


def _every_input_form(arrays: list[np.ndarray], tmp_path: Path) -> dict:
    """The same uint8 HWC images in every form the pixel interface takes, by name."""
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")  # PNG: lossless, so the file decodes to the same pixels
        Image.fromarray(a).save(paths[-1])
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    return {
        "pil": [Image.fromarray(a) for a in arrays],
        "str paths": [str(p) for p in paths],
        "Path paths": paths,
        "uint8 arrays": arrays,
        "uint8 NHWC array": np.stack(arrays),
        "float NCHW tensor": torch.stack(tensors),
        "CHW tensors": tensors,
    }


def test_every_input_type_gives_the_sd3_latents(front: PixelFrontEnd, vae, tmp_path: Path) -> None:
    arrays = [_rgb(32, 48, seed=0), _rgb(32, 48, seed=1)]
    expected = _expected_latents(vae, arrays)
    for name, images in _every_input_form(arrays, tmp_path).items():
        groups = front.encode_images(images)
        assert len(groups) == 1, name
        index, latents = groups[0]
        assert index.tolist() == [0, 1], name
        assert latents.shape == (2, 16, 4, 6) and torch.equal(latents, expected), name


def test_resize_policy(front: PixelFrontEnd, vae) -> None:
    # 40x50: each side to the nearest multiple of 16 -> 48x48, bicubic with antialias, clamped to [0, 1].
    image = _rgb(40, 50)
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    resized = F.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    with torch.no_grad():
        expected = (vae.encode(resized * 2 - 1).latent_dist.mean - 0.0609) * 1.5305
    ((index, latents),) = front.encode_images([image])
    assert latents.shape == (1, 16, 6, 6) and torch.equal(latents, expected)
    # max_side: downscale keeping aspect (200x100 -> 64x32), then round; never above max_side.
    assert load_images([_rgb(200, 100)], max_side=64)[0].shape == (3, 64, 32)
    assert load_images([_rgb(100, 300)], max_side=100)[0].shape == (3, 32, 96)
    assert load_images([_rgb(5, 7)])[0].shape == (3, 16, 16)  # never below one multiple
    exact = torch.rand(3, 32, 16)
    assert torch.equal(load_images([exact])[0], exact)  # already a multiple: not resampled


def test_size_limit_of_the_backbone(front: PixelFrontEnd) -> None:
    # tiny: pos_embed_max_size 32 x patch 2 x VAE 8 = 512 pixels per side.
    assert front.image_encoder.max_image_side == 512
    with pytest.raises(ValueError, match="max_side=512"):
        front.encode_images([_rgb(600, 64)])
    ((_, latents),) = front.encode_images([_rgb(600, 64)], max_side=512)
    assert latents.shape[-2:] == (64, 6)  # 600x64 -> 512x54.6 -> rounded to 512x48 -> latent 64x6


def test_grouping_by_size_keeps_input_order(front: PixelFrontEnd, vae) -> None:
    small, wide, small2 = _rgb(32, 32, 0), _rgb(16, 64, 1), _rgb(32, 32, 2)
    groups = front.encode_images([small, wide, small2])
    assert [g[0].tolist() for g in groups] == [[0, 2], [1]]
    assert torch.equal(groups[0][1], _expected_latents(vae, [small, small2]))
    assert torch.equal(groups[1][1], _expected_latents(vae, [wide]))


def test_color_conversion(front: PixelFrontEnd) -> None:
    rgb = _rgb(16, 32)
    gray = rgb[:, :, 0]
    as_rgb = load_images([np.repeat(gray[:, :, None], 3, axis=2)])[0]
    for name, image in {
        "PIL L": Image.fromarray(gray, mode="L"),
        "HW array": gray,
        "HW1 array": gray[:, :, None],
        "1-channel tensor": torch.from_numpy(gray)[None].float() / 255,
    }.items():
        assert torch.equal(load_images([image])[0], as_rgb), name
    alpha = np.full((16, 32, 1), 7, np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    reference = load_images([rgb])[0]
    for name, image in {
        "PIL RGBA": Image.fromarray(rgba, mode="RGBA"),
        "HW4 array": rgba,
        "4-channel tensor": torch.from_numpy(rgba).permute(2, 0, 1).float() / 255,
    }.items():
        assert torch.equal(load_images([image])[0], reference), name  # alpha dropped, colour kept
    palette = Image.fromarray(rgb).convert("P")
    assert torch.equal(load_images([palette])[0], load_images([palette.convert("RGB")])[0])


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """16-bit grayscale PNGs and float (mode F) images: PIL's convert("RGB") would clip them to white / black."""
    ramp = np.arange(24 * 32, dtype=np.float64).reshape(24, 32) / (24 * 32 - 1)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "f32.tiff")
    for name in ("g16.png", "f32.tiff"):
        (x,) = load_images([tmp_path / name], size_multiple=8)
        assert x.shape == (3, 24, 32)
        torch.testing.assert_close(x[0].double(), torch.from_numpy(ramp), rtol=0, atol=1e-4, msg=name)
        assert torch.equal(x[0], x[2])
    Image.fromarray(np.full((8, 8), 2.0, np.float32), mode="F").save(tmp_path / "bright.tiff")
    with pytest.raises(ValueError, match=r"mode F has values in \[2, 2\]; expected floats in \[0, 1\]"):
        load_images([tmp_path / "bright.tiff"], size_multiple=8)


def test_bad_image_inputs(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = [
        ([], ValueError, "empty"),
        (torch.rand(0, 3, 16, 16), ValueError, "empty"),
        ([str(text)], ValueError, "not an image file"),
        ([tmp_path / "missing.png"], FileNotFoundError, "not found"),
        ([np.zeros((16, 16, 3), np.float32)], TypeError, "uint8"),
        ([np.zeros((16,), np.uint8)], ValueError, "HWC"),
        ([np.zeros((16, 16, 2), np.uint8)], ValueError, "channels"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError, "float"),
        (torch.full((1, 3, 16, 16), 1.5), ValueError, r"\[0, 1\]"),
        (torch.full((1, 3, 16, 16), -0.1), ValueError, r"\[0, 1\]"),
        (torch.full((1, 3, 16, 16), float("nan")), ValueError, r"\[0, 1\]"),
        (torch.rand(1, 1, 3, 16, 16), ValueError, "NCHW"),
        ([torch.rand(16, 16)], ValueError, "CHW"),
        ([torch.rand(2, 16, 16)], ValueError, "channels"),
        ([3], TypeError, "PIL image"),
        (42, TypeError, "list of PIL"),
    ]
    for images, error, match in cases:
        with pytest.raises(error, match=match):
            load_images(images)
    with pytest.raises(ValueError, match="max_side"):
        load_images([_rgb(16, 16)], max_side=4)


def test_vae_decode_inverts_the_normalisation(front: PixelFrontEnd, vae) -> None:
    latents = torch.randn(2, 16, 4, 6)
    images = front.vae_decode(latents)
    with torch.no_grad():
        expected = (vae.decode(latents / 1.5305 + 0.0609).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 3, 32, 48) and images.dtype == torch.float32
    assert torch.equal(images, expected)


def test_image_encoder_batches_within_vae_batch_size(vae) -> None:
    encoder = ImageEncoder(vae, device="cpu", patch_size=2, pos_embed_max_size=32, batch_size=2)
    arrays = [_rgb(16, 16, seed=i) for i in range(5)]
    ((index, latents),) = encoder.encode(arrays)
    assert index.tolist() == list(range(5))
    expected = torch.cat([_expected_latents(vae, arrays[i : i + 2]) for i in (0, 2, 4)])
    assert torch.equal(latents, expected)


# ------------------------------------------------------------------------------------------------- prepare


def test_prepare_pairs_images_with_prompts(front: PixelFrontEnd) -> None:
    images = [_rgb(32, 32, 0), _rgb(16, 64, 1), _rgb(32, 32, 2), _rgb(32, 32, 3)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    groups = front.prepare(images, prompts, progress=False)
    embeds, pooled = front.encode_prompts(prompts)  # one row per image
    latents = {tuple(index.tolist()): z for index, z in front.encode_images(images)}
    assert [g.index.tolist() for g in groups] == [[0, 2, 3], [1]]
    assert [len(g.prompt_embeds) for g in groups] == [2, 1]  # distinct prompts only
    assert groups[0].prompt_index.tolist() == [0, 0, 1]
    for group in groups:
        assert torch.equal(group.latents, latents[tuple(group.index.tolist())])
        assert torch.equal(group.prompt_embeds[group.prompt_index], embeds[group.index])
        assert torch.equal(group.pooled[group.prompt_index], pooled[group.index])
    with pytest.raises(ValueError, match="4 images but 2 prompts"):
        front.prepare(images, prompts[:2])
    with pytest.raises(ValueError, match="empty"):
        front.prepare([], [])
    with pytest.raises(TypeError, match="one per image"):
        front.prepare(images[:1], "a cat")


def test_progress_only_for_large_inputs() -> None:
    assert _progress(8, "vae", "img", None).disable
    assert not _progress(1000, "vae", "img", None).disable
    assert _progress(1000, "vae", "img", False).disable
    assert not _progress(1, "text", "prompt", True).disable
