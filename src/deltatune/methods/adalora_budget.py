"""AdaLoRA's rank budget (PEFT's RankAllocator): which triplets (P_i, E_i, Q_i) keep training.

After each optimizer step, for every entry w of every P, E and Q (methods/adalora.py):

    I = |w * grad|                                   sensitivity
    Ibar = beta1 * Ibar + (1 - beta1) * I            smoothed
    U = beta2 * U + (1 - beta2) * |I - Ibar|         its uncertainty
    s(w) = Ibar * U

and a triplet scores s(E_i) + mean_j s(Q_ij) + mean_k s(P_ki). The budget (total kept triplets)
stays at init_r x modules for `tinit` steps, then falls cubically to target_r x modules at step
total_step - tfinal:

    budget(t) = int((b_init - b_target) * (1 - (t - tinit) / (total_step - tfinal - tinit))^3 + b_target)

Every `deltaT` steps the triplets scoring at or below the (b_init - budget)-th smallest score get
E_i = 0. At step total_step - tfinal the final allocation (budget b_target) becomes the config's
`rank_pattern`; after it the same triplets are zeroed at every step. This is PEFT's
`update_and_allocate` step for step, on the same scores (tests/test_adalora.py feeds both the
same gradients).

    model = dt.attach(base, dt.AdaLoRAConfig(init_r=12, target_r=8, total_step=steps))
    Trainer(model, cfg, data, loss_fn=with_orth_penalty(), callbacks=[RankAllocator(model)]).fit()
    model.save_pretrained(path)   # PEFT's ADALORA files: the kept triplets and rank_pattern

The Trainer calls callbacks after `zero_grad`, so the gradients are kept for the allocator as they
are when the optimizer steps (accumulated, clipped, unscaled): a hook on each parameter holds a
reference to its finished gradient until the next call (`p.grad` itself is read when it is still
there, as in PEFT's manual loop: backward, step, update_and_allocate, zero_grad)."""
from __future__ import annotations

import base64
import dataclasses

import numpy as np
import torch

from ..core.errors import ConfigError
from .adalora import PATTERN_SUFFIX, adalora_pieces

KEYS = ("lora_A", "lora_B", "lora_E")


class RankAllocator:
    """AdaLoRA's importance-driven rank allocation as a Trainer callback, called cb(trainer, step)
    after each optimizer step; `state_dict()` / `load_state_dict()` let an interrupted run resume exactly."""

    def __init__(self, model, name: str = "default"):
        self.pieces = adalora_pieces(model, name)
        # the allocator writes rank_pattern into the delta's config: a copy, so a config object the caller
        # also used elsewhere is left as it was
        self.config = model.configs[name] = dataclasses.replace(model.configs[name])
        if self.config.total_step is None:
            raise ConfigError("AdaLoRA's budget schedule needs the run's length: set AdaLoRAConfig(total_step=...) "
                              "to the number of optimizer steps (trainer.total_steps(), or epochs x batches per "
                              "epoch / grad_accum) before attaching the delta.")
        if any(p.lora_A.shape[0] != self.config.init_r for p in self.pieces.values()):
            raise ConfigError(f"Delta {name!r} was loaded with a rank pattern (its modules hold only the kept "
                              "triplets), so it cannot be budgeted again; train it further without RankAllocator, "
                              "or budget a fresh AdaLoRA delta.")
        self.params = {f"{path}.{k}": getattr(piece, k) for path, piece in self.pieces.items() for k in KEYS}
        self.init_bgt = sum(p.lora_A.shape[0] for p in self.pieces.values())
        self.target_bgt = self.config.target_r * len(self.pieces)
        self.step, self.budget = 0, self.init_bgt
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self._grads: dict[int, torch.Tensor] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._keep_grad) for p in self.params.values()]

    def _keep_grad(self, param: torch.Tensor) -> None:
        self._grads[id(param)] = param.grad

    # -- the callback ----------------------------------------------------------------------
    def __call__(self, trainer=None, step: int | None = None) -> None:
        """Update the importance and allocate the budget at `step` (default: one more than last time)."""
        self.step = self.step + 1 if step is None else int(step)
        try:
            self.update_and_allocate(self.step)
        finally:
            self._grads.clear()

    def update_and_allocate(self, step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate(step)."""
        final = self.config.total_step - self.config.tfinal
        if step < final:
            self._update_ipt()
            self.budget, mask = self.budget_schedule(step)
            if mask:
                self._mask_to_budget(self.budget)
        elif step == final:
            self.budget, _ = self.budget_schedule(step)
            self._mask_to_budget(self.budget)
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        elif self.config.rank_pattern is None:
            raise ConfigError(f"RankAllocator was first called at step {step}, after the budgeting ended (step "
                              f"{final} = total_step - tfinal): pass it to the Trainer from the first step.")
        else:
            self._zero_masked()

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget at `step`, whether to mask now): the cubic schedule between tinit and total_step - tfinal."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul ** 3) + self.target_bgt), step % c.deltaT == 0

    # -- importance ----------------------------------------------------------------------------
    def _update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for key, p in self.params.items():
                grad = p.grad if p.grad is not None else self._grads.get(id(p))
                if grad is None:
                    raise ConfigError(f"RankAllocator found no gradient for {key!r}: call it after loss.backward() "
                                      "and the optimizer step (before zero_grad), or pass it to the Trainer in "
                                      "callbacks=[...]; every AdaLoRA module must take part in the forward pass.")
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key], self.exp_avg_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
                ipt = (p * grad).abs().detach()
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
                self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module path: score of each triplet}, computed as PEFT does (same operations, same order)."""
        out = {}
        for path in self.pieces:
            s = {k: self.exp_avg_ipt[f"{path}.{k}"] * self.exp_avg_unc[f"{path}.{k}"] for k in KEYS}
            a = torch.mean(s["lora_A"], dim=1, keepdim=True)
            b = torch.mean(s["lora_B"], dim=0, keepdim=False).view(-1, 1)
            out[path] = s["lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1).view(-1)
        return out

    def _mask_to_budget(self, budget: int) -> None:
        """Zero E_i of every triplet scoring at or below the (init - budget)-th smallest score; record the pattern.
        (A budget equal to the initial one masks nothing; PEFT's kthvalue fails there.)"""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        device = next(iter(scores.values())).device
        threshold = torch.kthvalue(torch.cat([s.to(device) for s in scores.values()]), k=k)[0].item() if k > 0 \
            else None
        self._set_pattern({path: torch.ones_like(s, dtype=torch.bool) if threshold is None else ~(s <= threshold)
                           for path, s in scores.items()})
        self._zero_masked()

    def _set_pattern(self, kept: dict[str, torch.Tensor]) -> None:
        for path, flags in kept.items():
            self.pieces[path].kept = flags.detach().cpu()
        self.config.rank_pattern = {path + PATTERN_SUFFIX: flags.tolist() for path, flags in kept.items()}

    def _zero_masked(self) -> None:
        with torch.no_grad():
            for piece in self.pieces.values():
                if piece.kept is not None:
                    piece.lora_E.masked_fill_(~piece.kept.to(piece.lora_E.device).view(-1, 1), 0.0)

    # -- results ---------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        """Kept triplets per module path after the last allocation (init_r each before any)."""
        return {p: int(piece.kept.sum()) if piece.kept is not None else piece.lora_A.shape[0]
                for p, piece in self.pieces.items()}

    def remove(self) -> None:
        """Stop keeping gradients (remove the parameter hooks)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-ready state (the Trainer writes it into its checkpoints): step, budget, the smoothed
        sensitivities and uncertainties (float32 bytes, base64) and the last rank pattern."""
        enc = {key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "data": _encode(t)}
               for key, t in self.exp_avg_ipt.items()}
        unc = {key: _encode(t) for key, t in self.exp_avg_unc.items()}
        return {"format": 1, "step": self.step, "budget": self.budget, "total_step": self.config.total_step,
                "modules": sorted(self.pieces), "exp_avg_ipt": enc, "exp_avg_unc": unc,
                "rank_pattern": self.config.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output (the delta's weights are restored with the model)."""
        if state.get("modules") != sorted(self.pieces) or state.get("total_step") != self.config.total_step:
            raise ConfigError(f"This RankAllocator state ({len(state.get('modules', []))} modules, total_step "
                              f"{state.get('total_step')}) does not fit this delta ({len(self.pieces)} modules, "
                              f"total_step {self.config.total_step}): resume with the config and model the run "
                              "was started with.")
        self.step, self.budget = int(state["step"]), int(state["budget"])
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        for key, entry in state["exp_avg_ipt"].items():
            like = self.params[key]
            dtype = getattr(torch, entry["dtype"])
            self.exp_avg_ipt[key] = _decode(entry["data"], entry["shape"], dtype, like.device)
            self.exp_avg_unc[key] = _decode(state["exp_avg_unc"][key], entry["shape"], dtype, like.device)
        pattern = state["rank_pattern"]
        for piece in self.pieces.values():
            piece.kept = None
        if pattern is not None:
            self._set_pattern({key[:-len(PATTERN_SUFFIX)]: torch.tensor(flags, dtype=torch.bool)
                               for key, flags in pattern.items()})


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()).decode("ascii")


def _decode(text: str, shape, dtype, device) -> torch.Tensor:
    flat = np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)
    return torch.from_numpy(flat).view(*shape).to(device=device, dtype=dtype)
