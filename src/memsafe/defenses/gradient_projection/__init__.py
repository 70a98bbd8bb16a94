"""Gradient projection: concept-level exclusion during training (docs/defenses/gradient_projection.md).

Text reaches a text-to-image UNet only through layers that multiply text-encoder token embeddings c:
the cross-attention key/value projections (`attn2.to_k`, `attn2.to_v`). For such a weight W (out x d) and
an orthonormal basis U (d x k) of the prohibited concepts' embedding subspace, every update is restricted
to the orthogonal complement with `strength` s:  dW <- dW - s * dW U U^T.  At s = 1, W u stays
at its starting value for every u in span(U): training cannot change how the layer responds to the concept.

Two modes:
- "update" (default): snapshot W before the optimizer step and project the step's whole change dW
  afterwards. Exact under AdamW's per-element scaling, weight decay, mixed precision and accumulation.
- "gradient": project the gradient before the optimizer. Cheaper to reason about, but AdamW's
  per-element scaling and weight decay leak concept components back in; kept for comparison.
- "both": project the gradient before the optimizer and its update after. As exact as "update", and
  AdamW's moments see only the allowed part of the gradient. Under "update" alone they are built from
  the whole gradient, and what is left of the step after projection need not descend the loss: it
  matters when most of the gradient lies in the subspace (space: activations).
`project_every: N` (mode update) projects the change of N steps at once, and before every checkpoint,
IET aggregation and the end of training (the loop's `on_sync`): the guarantee holds at those points.

Under LoRA (W = W0 + B A, A: r x d) the same is applied to A, and A is initialised as A (I - U U^T), so
(B A) u = 0 stays true whatever B learns.

Extensions: `space: activations` gives every trainable layer its own subspace of inputs
(activation_basis.py); `sink` gives the concept images' content an explanation that no prompt produces
(sink.py). The default `profile: recommended` turns both on and projects every 10 steps; `profile: paper` is
the published key/value projection alone. Under `experimental`: `counterfactual` adds the directions by which a
concept phrase changes the other tokens of its training captions; `project_inputs` trains on caption embeddings
without their concept component; `scope: concept_samples` projects only the concept samples' share of each
gradient (concept_samples.py).

Modules: captions.py (which captions name a concept), subspace.py (bases and the projector), text_basis.py,
activation_basis.py, sink.py, hook.py (the training hook and its factory), report.py.
"""


from __future__ import annotations

from memsafe.defenses.contract import Defense
from memsafe.defenses.gradient_projection.config import GradientProjectionConfig, validate


def _hooks(config, train_set):
    from memsafe.defenses.gradient_projection.hook import hook_maker

    return hook_maker(config, train_set)


def _evaluate(run_dir, config):
    return {"projection_strength": config.defense.gradient_projection.strength}


def _report(report, run_dir, metrics, log_rows):
    from memsafe.defenses.gradient_projection.report import add_projection

    add_projection(report, run_dir, metrics, log_rows)


DEFENSE = Defense(
    name="gradient_projection",
    config=GradientProjectionConfig,
    summary="gradient projection (concept level): updates of the layers that read a concept lose its component",
    validate=validate,
    hooks=_hooks,
    evaluate=_evaluate,
    report=_report,
    demo_config="demo-text.yaml",
)
