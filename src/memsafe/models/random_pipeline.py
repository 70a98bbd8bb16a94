"""Stable Diffusion pipeline folders with random weights, built from configs: for tests and benchmarks,
which must not download weights. `tiny` is a few hundred thousand UNet parameters; `sd15` is the Stable
Diffusion 1.5 architecture (860M-parameter UNet, AutoencoderKL, CLIP ViT-L/14 text encoder).

The tokenizer is CLIP's real BPE vocabulary, derived from `bpe_simple_vocab_16e6.txt.gz` as shipped inside the
`clip-anytorch` or `open_clip_torch` wheels (installed with `--no-deps`; neither is imported).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import torch

from memsafe.errors import MemsafeError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 48894  # lines 1 .. 48894 of the file; 256 bytes x 2 + merges + 2 special tokens = 49,408 tokens

UNETS = {
    "tiny": dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8),
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
}
VAES = {
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 sample_size=32),
    "sd15": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512),
}
TEXT_ENCODERS = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}


def bpe_vocabulary_path() -> Path:
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / BPE_FILE).is_file():
                return Path(folder) / BPE_FILE
    raise MemsafeError(f"the CLIP vocabulary {BPE_FILE} was not found: pip install --no-deps clip-anytorch")


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's reversible byte -> printable-character table, in byte order of its construction."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of CLIP's tokenizer, then a CLIPTokenizer saved into `folder` the usual way."""
    from transformers import CLIPTokenizer

    lines = gzip.open(bpe_vocabulary_path()).read().decode("utf-8").split("\n")[1 : MERGES + 1]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(line.split()) for line in lines]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    tokenizer = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        (raw / name).unlink()
    raw.rmdir()


def build_random_pipeline(out: str | Path, size: str = "tiny", prediction_type: str = "epsilon",
                          vae: str = "kl", seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder with random weights (`vae`: "kl" AutoencoderKL, "tiny" AutoencoderTiny)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **UNETS[size])
    if vae == "tiny":
        autoencoder = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16))
    else:
        layers = len(VAES[size]["block_out_channels"])
        autoencoder = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * layers,
                                    up_block_types=("UpDecoderBlock2D",) * layers, **VAES[size])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                                **TEXT_ENCODERS[size]))
    write_clip_tokenizer(out / "tokenizer")
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type)
    pipeline = StableDiffusionPipeline(vae=autoencoder, text_encoder=text_encoder,
                                       tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(out)
    return out
