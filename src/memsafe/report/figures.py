"""Figures a person reads: generations beside their nearest training images, sample sheets and curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from memsafe.data.images import to_unit_range  # noqa: E402


def _show(ax, image: torch.Tensor) -> None:
    array = to_unit_range(image).permute(1, 2, 0).numpy()
    ax.imshow(array[:, :, 0] if array.shape[2] == 1 else array, cmap="gray" if array.shape[2] == 1 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def save_nearest_grid(
    samples: torch.Tensor,
    train_images: torch.Tensor,
    nearest_index: torch.Tensor,
    ratios: torch.Tensor,
    path: Path,
    count: int = 16,
    threshold: float = 1 / 3,
) -> None:
    """The `count` generations closest to a training image, each above its nearest training image,
    with the NN1/NN2 distance ratio under the pair (red below the memorization threshold)."""
    order = ratios.argsort()[:count]
    columns = min(8, len(order))
    rows = -(-len(order) // columns)
    fig, axes = plt.subplots(2 * rows, columns, figsize=(1.3 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for slot, i in enumerate(order.tolist()):
        r, c = divmod(slot, columns)
        top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
        for ax, image in ((top, samples[i]), (bottom, train_images[int(nearest_index[i])])):
            ax.axis("on")
            _show(ax, image)
        ratio = float(ratios[i])
        bottom.set_xlabel(f"{ratio:.3f}", color="red" if ratio < threshold else "black", fontsize=9)
    axes[0, 0].set_ylabel("generated", fontsize=8)
    if rows:
        axes[1, 0].set_ylabel("nearest train", fontsize=8)
    fig.suptitle(f"Closest generations and their nearest training images (ratio < {threshold:.3f} = memorized)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def save_image_grid(images: torch.Tensor, path: Path, columns: int = 16, title: str | None = None) -> None:
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(0.7 * columns, 0.7 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images):
        _show(ax, image)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def save_curve(
    x: list[float], y: list[float], path: Path, xlabel: str, ylabel: str, log_y: bool = False, marker: str = ""
) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(x, y, marker=marker)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    fig.tight_layout()
    _save(fig, path)


def save_loss_curve(log_rows: list[dict], path: Path) -> None:
    save_curve([r["step"] for r in log_rows], [r["loss"] for r in log_rows], path, "step", "training loss", log_y=True)


def _save(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    tmp.replace(path)


def save_side_by_side(images: dict[str, Path], path: Path) -> None:
    """Saved figures (PNG files) side by side, each under its title: e.g. the nearest-neighbour figures of
    an undefended and a defended run."""
    import matplotlib.image as mpimg

    fig, axes = plt.subplots(1, len(images), figsize=(7 * len(images), 6), squeeze=False)
    for ax, (title, image_path) in zip(axes[0], images.items()):
        ax.imshow(mpimg.imread(image_path))
        ax.set_title(title, fontsize=12)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
