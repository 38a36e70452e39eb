"""Trust-region / adversarial regularisers for fine-tuning, as loss functions for the loop.

- R3F (Aghajanyan et al. 2021): L(f(x), y) + lambda * KL_sym(f(x) || f(x + z)), z ~ N(0, eps^2)
  or U(-eps, eps) added to the input embeddings.
- R4F: R3F plus a spectrally normalised classification head (`SpectralNormHead`, a loop
  callback that rescales the head's weight to spectral norm 1 after every step).
- SMART (Jiang et al. 2020): the smoothness-inducing term with an adversarial z: start from
  small noise, take `steps` normalised gradient-ascent steps of size `step_size` on the
  symmetric KL, project to the eps ball, then add lambda * KL_sym(f(x) || f(x + z)).
  (SMART's Bregman proximal-point momentum term is not included.)

The perturbation enters through a temporary forward hook on the input-embedding module, so
every architecture keeps its own inputs (input_ids stay, e.g. for last-token pooling)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..core.copy import TrainableCopy
from ..core.errors import ConfigError
from ..core.targets import output_head_names
from ..eval.evaluators import model_inputs

KINDS = ("none", "r3f", "r4f", "smart")


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p||q) + KL(q||p), averaged over the batch (logits over the last dimension)."""
    p, q = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    kl_pq = F.kl_div(q, p, log_target=True, reduction="batchmean")
    kl_qp = F.kl_div(p, q, log_target=True, reduction="batchmean")
    return kl_pq + kl_qp


def _plain(model):
    return getattr(model, "module", model)  # a DDP-wrapped model keeps the real one in .module


@contextlib.contextmanager
def perturbed_embeddings(model, delta_fn):
    """Inside the block, the input embeddings' output e becomes e + delta_fn(e)."""
    handle = _plain(model).get_input_embeddings().register_forward_hook(lambda m, i, out: out + delta_fn(out))
    try:
        yield
    finally:
        handle.remove()


def sample_noise(like: torch.Tensor, eps: float, noise: str) -> torch.Tensor:
    if noise == "normal":
        return torch.randn_like(like) * eps
    if noise == "uniform":
        return (torch.rand_like(like) * 2 - 1) * eps
    raise ConfigError(f"noise must be normal or uniform, got {noise!r}.")


def make_regularized_loss(kind: str = "r3f", weight: float = 1.0, eps: float = 1e-5, noise: str = "normal",
                          steps: int = 1, step_size: float = 1e-3):
    """loss_fn(model, batch) = task loss + weight * symmetric KL under an embedding perturbation."""
    if kind not in KINDS:
        raise ConfigError(f"regularizer must be one of {', '.join(KINDS)}, got {kind!r}.")

    def loss_fn(model, batch):
        inputs = model_inputs(batch)
        out = model(**inputs)
        if kind == "none" or not weight:
            return out.loss
        clean = out.logits
        plain = {k: v for k, v in inputs.items() if k != "labels"}
        if kind in ("r3f", "r4f"):
            with perturbed_embeddings(model, lambda e: sample_noise(e, eps, noise)):
                noisy = model(**plain).logits
        else:
            noisy = smart_logits(model, plain, clean.detach(), eps, noise, steps, step_size)
        return out.loss + weight * symmetric_kl(clean, noisy)
    return loss_fn


def smart_logits(model, inputs, clean, eps, noise, steps, step_size):
    """Logits at an adversarial embedding perturbation found by normalised gradient ascent."""
    state = {}

    def delta(e):
        if "z" not in state:
            state["z"] = sample_noise(e, eps, noise).detach().requires_grad_(True)
        return state["z"]

    with perturbed_embeddings(model, delta):
        for _ in range(steps):
            kl = symmetric_kl(clean, model(**inputs).logits)
            (grad,) = torch.autograd.grad(kl, state["z"])
            z = state["z"] + step_size * grad / (grad.norm(dim=-1, keepdim=True) + 1e-12)
            state["z"] = z.clamp(-eps, eps).detach().requires_grad_(True)  # back into the eps ball
        return model(**inputs).logits


class SpectralNormHead:
    """Loop callback (R4F): after every optimizer step, divide each trained head's Linear weight
    by its largest singular value, keeping the head 1-Lipschitz as spectral normalisation does."""

    def __init__(self, model):
        heads = output_head_names(model.base_model)
        self.weights = []
        for path, layer in model.delta_layers():
            if any(path == h or path.startswith(h + ".") for h in heads):
                for piece in layer.deltas.values():
                    if isinstance(piece, TrainableCopy):
                        self.weights += [m.weight for m in piece.module.modules() if isinstance(m, torch.nn.Linear)]
        if not self.weights:
            raise ConfigError("R4F normalises a trained classification head, and this delta trains none "
                              "(modules_to_save is empty).")

    @torch.no_grad()
    def __call__(self, trainer, step):
        for w in self.weights:
            w.div_(torch.linalg.matrix_norm(w.float(), ord=2).clamp(min=1e-12).to(w.dtype))
