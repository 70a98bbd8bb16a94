"""Is IET-AGC+'s latent-space augmentation the pixel-space one? Trains a small AutoencoderKL of SD's layout
(four DownEncoderBlock2D stages, so one latent cell = 8 px, mid-block attention, 4 latent channels) on real
emoji at 64 px on the CPU, then compares, on held-out emoji, augmenting the latent (what memsafe does:
`augment_latents`, whole-cell shifts with repeated edge cells, flips) with encoding the augmented image.

Readings per augmentation (means over held-out images):
  latent_error      |aug(E(x)) - E(aug(x))| / |E(aug(x))|, on the latent means; `interior_latent_error` the same
                    without the cells that a shift brings in or moves past the border.
  pixel_error       mean square of D(aug(E(x))) - aug(x), in [-1, 1] pixel units.
  reencode_error    mean square of D(E(aug(x))) - aug(x): the VAE's own reconstruction error on the same
                    targets; pixel_error / reencode_error is the cost of augmenting in latent space.

    memsafe data emoji data/emoji64 --size 64     # once
    python bench/latent_shift.py data/emoji64 [--steps 2000]
    python bench/latent_shift.py IMAGE_FOLDER --vae SD_FOLDER/vae --size 512   # a trained VAE of your own
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

sys.path.insert(0, str(Path(__file__).parent))
from results_io import RESULTS, write_results  # noqa: E402

from memsafe.data.image_folder import load_image_folder  # noqa: E402


def small_sd_vae() -> AutoencoderKL:
    """SD's AutoencoderKL layout (factor 8, mid-block attention, 4 latent channels), narrower."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64, 64, 64), norm_num_groups=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int, seed: int) -> list[float]:
    """Reconstruction (L1 + MSE) plus a small KL term, as SD's VAE loss without its GAN and perceptual parts."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 250 == 0:
            print(f"step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}", flush=True)
    return losses


def shift_cells(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Translation by (dx, dy) cells of `x`'s own grid, the edge cells repeated (as `augment_latents`)."""
    side = x.shape[-1]
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
    return F.pad(x, pad, mode="replicate")[..., pad[3]: pad[3] + side, pad[1]: pad[1] + side]


def augmentations(factor: int) -> dict:
    """name -> (pixel augmentation, latent augmentation, latent cells the shift touches at the border)."""
    found = {}
    for name, (dx, dy) in {"shift_x1": (1, 0), "shift_y1": (0, 1), "shift_xy1": (1, 1), "shift_x2": (2, 0)}.items():
        found[name] = (lambda x, dx=dx, dy=dy: shift_cells(x, dx * factor, dy * factor),
                       lambda z, dx=dx, dy=dy: shift_cells(z, dx, dy), max(abs(dx), abs(dy)))
    found["flip"] = (lambda x: x.flip(-1), lambda z: z.flip(-1), 0)
    return found


@torch.no_grad()
def measure(vae: AutoencoderKL, images: torch.Tensor, factor: int) -> dict:
    vae.eval()
    encode = lambda x: vae.encode(x).latent_dist.mean  # noqa: E731
    decode = lambda z: vae.decode(z).sample.clamp(-1, 1)  # noqa: E731
    latents = encode(images)
    readings = {"reconstruction_error": F.mse_loss(decode(latents), images).item()}
    for name, (pixel_aug, latent_aug, border) in augmentations(factor).items():
        target = pixel_aug(images)
        reencoded = encode(target)
        moved = latent_aug(latents)
        inside = slice(border, latents.shape[-1] - border) if border else slice(None)
        readings[name] = {
            "latent_error": ((moved - reencoded).norm() / reencoded.norm()).item(),
            "interior_latent_error": ((moved - reencoded)[..., inside, inside].norm()
                                      / reencoded[..., inside, inside].norm()).item(),
            "pixel_error": F.mse_loss(decode(moved), target).item(),
            "reencode_error": F.mse_loss(decode(reencoded), target).item(),
        }
        readings[name]["pixel_over_reencode"] = readings[name]["pixel_error"] / readings[name]["reencode_error"]
    return readings


def markdown(results: dict) -> list[str]:
    lines = [f"VAE reconstruction MSE on held-out emoji: {results['heldout']['reconstruction_error']:.5f}", "",
             "| augmentation | latent error | interior latent error | pixel MSE, latent aug | pixel MSE, re-encode | ratio |",
             "|---|---|---|---|---|---|"]
    for name, r in results["heldout"].items():
        if isinstance(r, dict):
            lines.append(f"| {name} | {r['latent_error']:.3f} | {r['interior_latent_error']:.3f} | {r['pixel_error']:.5f}"
                         f" | {r['reencode_error']:.5f} | {r['pixel_over_reencode']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by `memsafe data emoji ... --size 64`")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--vae", help="measure this trained AutoencoderKL folder (e.g. SD's vae/) instead of training one")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "latent_shift.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    images = load_image_folder(args.folder, args.size, 3).as_model_input()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    heldout, train = images[order[: args.heldout]], images[order[args.heldout:]]
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True) if args.vae else small_sd_vae()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    results = {"vae": {"factor": factor, "size": args.size}}
    if args.vae:
        results["vae"]["path"] = args.vae
    else:
        started = time.perf_counter()
        losses = train_vae(vae, train, args.steps, args.batch_size, args.seed)
        results["vae"] |= {"parameters": sum(p.numel() for p in vae.parameters()), "steps": args.steps,
                           "batch_size": args.batch_size, "train_s": time.perf_counter() - started,
                           "final_loss": sum(losses[-100:]) / len(losses[-100:])}
        results["untrained"] = measure(small_sd_vae().eval(), heldout[:64], factor)
    results["heldout"] = measure(vae, heldout, factor)
    write_results(Path(args.out), results, markdown(results))


if __name__ == "__main__":
    main()
