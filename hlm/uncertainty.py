"""Epistemic uncertainty by temperature perturbation (U-HLM): resample the draft position K times from the
*same* logits at random temperatures and count disagreements with the draft. No extra forward pass.
"""

from __future__ import annotations

import torch

MIN_THETA = 1e-3  # theta ~ U(0, theta_max); a floor keeps z / theta finite


def uncertainty(logits: torch.Tensor, draft: int, n_samples: int, theta_max: float,
                generator: torch.Generator, valid: torch.Tensor | None = None) -> float:
    """u = mean_i 1[d_i != draft], d_i ~ softmax(z / theta_i), theta_i ~ U(0, theta_max).

    Sampling uses the Gumbel-max trick (argmax(z/theta + g) ~ softmax(z/theta)), which avoids K softmaxes.
    """
    z = logits.to(torch.float32)
    if valid is not None:
        z = z.masked_fill(~valid[: z.shape[-1]], float("-inf"))
    thetas = torch.rand(n_samples, 1, generator=generator, device=z.device) * theta_max
    thetas = thetas.clamp_min(MIN_THETA)
    uniform = torch.rand(n_samples, z.shape[-1], generator=generator, device=z.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
    samples = (z / thetas + gumbel).argmax(-1)
    return float((samples != draft).to(torch.float32).mean())
