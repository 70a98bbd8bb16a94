"""Diagnostic: where IET-AGC+'s FID cost on the emoji benchmark comes from. The default rule runs as it is,
except that its skips fall on the duplicated images only (an oracle no defense has: the split's
`duplicated` flags): if the FID cost goes with it, it comes from the unique images the rule skips too.

    python bench/emoji_oracle.py /tmp/emoji32 --seed-list 0 --workdir /tmp/w_o0 --out /tmp/oracle0.json

Takes bench/emoji.py's arguments; the variant is `iet_agc_plus_oracle` (bench/emoji.py's `iet_agc_plus`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import emoji  # noqa: E402

from memsafe.data import load_dataset  # noqa: E402
from memsafe.defenses.iet_agc import driver  # noqa: E402
from memsafe.defenses.iet_agc.agc import AntiGradientControl  # noqa: E402


class DuplicatesOnly(AntiGradientControl):
    """AGC whose rule never skips a unique image's draw."""

    duplicated: dict[str, torch.Tensor] = {}  # per training folder: the flag of every training image

    def on_batch_start(self, batch, trainer):
        source = trainer.config.data.source
        if source not in self.duplicated:
            names = load_dataset(trainer.config.data)[0].names
            self.duplicated[source] = emoji.duplicated_flags(Path(source), names)
        self.flags = self.duplicated[source]
        return super().on_batch_start(batch, trainer)

    def skips(self, score: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return super().skips(score, index) & self.flags[index]


if __name__ == "__main__":
    driver.AntiGradientControl = DuplicatesOnly
    emoji.VARIANTS["iet_agc_plus_oracle"] = emoji.VARIANTS["iet_agc_plus"]
    if "--variants" not in sys.argv:
        sys.argv += ["--variants", "iet_agc_plus_oracle"]
    emoji.main()
