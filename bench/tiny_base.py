"""A tiny random SD3.5 base model on disk, in the exact diffusers directory layout.

Tests, the README's main command and CPU smoke runs need a *base directory* shaped like a real SD3.5 download
(``model_index.json``, ``scheduler/``, ``transformer/`` (sharded), ``vae/``, three text encoders and three
tokenizers) without a model hub. `make_tiny_base` writes one from random weights in a few seconds and a few MB:

- ``transformer/``: `SD3Transformer2DModel` with the ``tiny`` preset of `engine.config` (hidden 32, 4 blocks,
  qk RMSNorm, dual attention in block 0), saved in several shards with an index json, so loaders exercise the
  sharded path that the 8B checkpoint takes.
- ``vae/``: `AutoencoderKL` with SD3's latent layout (16 channels, 8x downsampling through 4 blocks, shift 0.0609,
  scale 1.5305, no quant convs) and 8 channels per block.
- ``text_encoder/`` CLIP-L-like (width 32), ``text_encoder_2/`` CLIP-G-like (width 48): pooled = 32 + 48 = 80 =
  ``pooled_projection_dim``; ``text_encoder_3/`` T5-like with ``d_model`` 96 = ``joint_attention_dim``.
- tokenizers built locally from a small word list: byte-level BPE CLIP tokenizers (vocab.json + merges.txt, as
  CLIP ships them) and a Unigram T5 tokenizer (``tokenizer.json`` with ``<pad>``=0, ``</s>``=1, ``<unk>``=2).

Same seed, same weights. `default_tiny_base` builds one copy per user cache and returns its path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from pydantic import Field

from engine.config import PRESETS, SD3_LATENT_SCALE, SD3_LATENT_SHIFT
from engine.schema import Schema, Seed, parse_cli

# Bump when the layout or any config below changes: the cached default copy lives under this name.
TINY_BASE_VERSION = "tiny-base-v1"

# The T5 context the tokenizer advertises; SD3 pipelines pass max_sequence_length explicitly (256, or 128 in
# Flow-GRPO), so this only bounds what a caller may ask for.
_T5_MODEL_MAX_LENGTH = 512
_CLIP_MAX_LENGTH = 77

# Enough words to tokenize typical test prompts into real (non-<unk>) pieces; characters outside it fall back to
# byte pieces (CLIP) or single-character pieces / <unk> (T5).
_WORD_TEXT = """
a an the of and with in on at by for from to under over near behind beside above below into through
photo photograph picture painting drawing sketch render illustration portrait landscape closeup close up view
cat cats dog dogs bird birds horse fish lion tiger bear fox wolf rabbit mouse owl eagle duck cow sheep
man woman men women person people child children boy girl baby king queen robot astronaut wizard knight
tree trees flower flowers forest garden mountain mountains river lake sea ocean beach island desert sky cloud
clouds sun moon star stars rain snow fire water city street house castle bridge tower road car boat ship train
red orange yellow green blue purple pink black white gray brown golden silver dark bright colorful
big small tiny huge old young happy sad cute beautiful detailed realistic high quality best sharp blurry
sitting standing running flying walking eating reading holding wearing riding playing sleeping looking
hat glasses coat dress shirt book cup table chair window door wall floor bed lamp clock phone computer
one two three four five many some several morning night evening sunset sunrise winter summer spring autumn
style oil watercolor digital art anime cartoon cinematic lighting studio soft light shadow background
"""
_WORDS = _WORD_TEXT.split()

_POSITIONAL = {"cli": {"positional": True}}


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte-to-printable-unicode table, in CLIP's vocabulary order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary in CLIP's format: 256 byte symbols, the same with ``</w>``, then one merge per
    word prefix, then ``<|startoftext|>`` and ``<|endoftext|>`` last (CLIP's order: EOS has the largest id, which
    CLIP's pooling relies on when it takes the argmax of the ids).

    Every merge result is in the vocabulary, so any merge order the BPE applies yields valid tokens.
    """
    byte_symbols = _byte_symbols()
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[str] = []
    seen = set(vocab_list)
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in seen:
                seen.add(merged)
                merges.append(f"{left} {right}")
                vocab_list.append(merged)
            left = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def _write_clip_tokenizer(directory: Path, pad_token: str) -> int:
    """Write a CLIP tokenizer the way SD3 ships it (vocab.json, merges.txt, configs); returns the vocab size.

    SD3's ``tokenizer`` pads with ``<|endoftext|>`` and ``tokenizer_2`` with ``!``; the tiny copies keep that.
    """
    vocab, merges = _clip_vocab_and_merges(_WORDS)
    directory.mkdir(parents=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _CLIP_MAX_LENGTH,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def _write_t5_tokenizer(directory: Path) -> int:
    """Write a T5 tokenizer as ``tokenizer.json`` (the fast format SD3's ``tokenizer_3`` loads); returns vocab size.

    A Unigram model with T5's id layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), Metaspace pre-tokenization and a
    post-processor appending ``</s>``: what `T5TokenizerFast` builds from T5's sentencepiece model, minus its
    32k pieces and its precompiled NFKC map (plain NFKC here).
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    # Whole words are cheap (score -3) so the Viterbi segmentation prefers them; single characters are the expensive
    # fallback so that any word made of ASCII letters, digits and punctuation still tokenizes without <unk>.
    pieces += [("▁" + w, -3.0) for w in dict.fromkeys(_WORDS)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()"
    pieces += [(c, -8.0) for c in chars] + [("▁" + c, -8.0) for c in chars]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": _T5_MODEL_MAX_LENGTH,
        "extra_ids": 0,
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab_size()


def _build_models(seed: int, clip_vocab: int, t5_vocab: int) -> dict[str, torch.nn.Module]:
    """Random-weight models; each component reseeds so that changing one leaves the others' weights unchanged."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    backbone = PRESETS["tiny"]
    eos, bos = clip_vocab - 1, clip_vocab - 2  # ids of <|endoftext|>, <|startoftext|> (see _clip_vocab_and_merges)

    def clip(width: int, heads: int, act: str, pad_id: int) -> CLIPTextModelWithProjection:
        # SD3's encoders: CLIP-L uses quick_gelu, OpenCLIP bigG uses gelu; the projection keeps the width.
        config = CLIPTextConfig(
            vocab_size=clip_vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=heads, max_position_embeddings=_CLIP_MAX_LENGTH, projection_dim=width,
            hidden_act=act, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad_id,
        )  # fmt: skip
        return CLIPTextModelWithProjection(config)

    models: dict[str, torch.nn.Module] = {}
    torch.manual_seed(seed)
    models["transformer"] = SD3Transformer2DModel(
        sample_size=backbone.sample_size, patch_size=backbone.patch_size, in_channels=backbone.in_channels,
        num_layers=backbone.num_layers, attention_head_dim=backbone.attention_head_dim,
        num_attention_heads=backbone.num_attention_heads, joint_attention_dim=backbone.joint_attention_dim,
        caption_projection_dim=backbone.caption_projection_dim, pooled_projection_dim=backbone.pooled_projection_dim,
        out_channels=backbone.in_channels, pos_embed_max_size=backbone.pos_embed_max_size, qk_norm=backbone.qk_norm,
        dual_attention_layers=backbone.dual_attention_layers,
    )  # fmt: skip
    torch.manual_seed(seed + 1)
    models["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=16,
        sample_size=64, scaling_factor=SD3_LATENT_SCALE, shift_factor=SD3_LATENT_SHIFT,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    )  # fmt: skip
    torch.manual_seed(seed + 2)
    models["text_encoder"] = clip(32, 2, "quick_gelu", pad_id=eos)  # pads with <|endoftext|>
    torch.manual_seed(seed + 3)
    models["text_encoder_2"] = clip(48, 3, "gelu", pad_id=0)  # pads with "!" (byte symbol id 0)
    torch.manual_seed(seed + 4)
    t5 = T5Config(
        vocab_size=t5_vocab, d_model=backbone.joint_attention_dim, d_kv=16, d_ff=128, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    models["text_encoder_3"] = T5EncoderModel(t5)
    for model in models.values():
        model.eval()
    return models


def make_tiny_base(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random SD3.5 base directory at ``path`` (must not exist, or be empty) and return it.

    Loadable by ``StableDiffusion3Pipeline.from_pretrained(path)`` and
    ``SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")``; the transformer config equals
    ``PRESETS["tiny"]``. Deterministic for a given ``seed``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    root = Path(path)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty directory; pass a new path for the tiny base")
    root.mkdir(parents=True, exist_ok=True)

    # Tokenizers first (their vocab sizes set the embedding tables), written in the files SD3 ships, then loaded
    # back so the pipeline's save_pretrained writes model_index.json exactly as for a real pipeline.
    staging = root / ".tokenizers"
    clip_vocab = _write_clip_tokenizer(staging / "tokenizer", pad_token="<|endoftext|>")
    _write_clip_tokenizer(staging / "tokenizer_2", pad_token="!")
    t5_vocab = _write_t5_tokenizer(staging / "tokenizer_3")
    models = _build_models(seed, clip_vocab, t5_vocab)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        tokenizer=CLIPTokenizer.from_pretrained(staging / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(staging / "tokenizer_2"),
        tokenizer_3=T5TokenizerFast.from_pretrained(staging / "tokenizer_3"),
        **models,
    )
    pipe.save_pretrained(root)

    # Replace what save_pretrained wrote for the tokenizers and the transformer with SD3.5's own files:
    # - tokenizers: the hand-written files (tokenizer serialisation differs across transformers versions; these
    #   are the formats every version reads);
    # - transformer: sharded like the 8B checkpoint (~4 shards here) so that loaders cover the index-json path.
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.rmtree(root / name)
        (staging / name).rename(root / name)
    staging.rmdir()
    transformer = models["transformer"]
    shutil.rmtree(root / "transformer")
    shard_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters()) // 4 + 1
    transformer.save_pretrained(root / "transformer", max_shard_size=shard_bytes)

    # model_index.json as SD3.5 ships it: tokenizer_3 is T5TokenizerFast (on transformers 5 the same class as
    # T5Tokenizer, which save_pretrained records; on 4.x T5Tokenizer would need a sentencepiece file).
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return root


def _cache_root() -> Path:
    base = os.environ.get("DIT_REWARD_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dit-reward"


def default_tiny_base() -> Path:
    """The shared tiny base (seed 0), built once under the user cache (``$DIT_REWARD_CACHE`` or
    ``~/.cache/dit-reward``) as ``tiny-base-v1`` and reused afterwards.

    Built in a temporary sibling directory and renamed into place, so a reader never sees a half-written copy and
    concurrent first calls (pytest-xdist, several CLIs) at worst build it twice.
    """
    target = _cache_root() / TINY_BASE_VERSION
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{TINY_BASE_VERSION}-", dir=target.parent))
    try:
        make_tiny_base(scratch / "base", seed=0)
        try:
            os.rename(scratch / "base", target)
        except OSError:
            # Another process renamed its copy first (the target now exists and is complete): use that one.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


class TinyBaseArgs(Schema):
    """Write a tiny random SD3.5 base directory (diffusers layout)."""

    path: str = Field(
        min_length=1, description="output directory (must not exist, or be empty)", json_schema_extra=_POSITIONAL
    )
    seed: Seed = Field(0, description="weights seed")


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(TinyBaseArgs, argv, "python -m bench.tiny_base", TinyBaseArgs.__doc__)
    print(make_tiny_base(Path(args.path), seed=args.seed))


if __name__ == "__main__":
    main()


__all__ = ["TINY_BASE_VERSION", "default_tiny_base", "make_tiny_base"]
