"""L2-SP (Li et al. 2018): the body decays toward its start weights theta_0, not toward zero.

A stage with `l2sp: {alpha_sp, beta}` gives every body parameter (all groups but the head) a
decoupled pull toward theta_0 before each AdamW update, theta <- theta - lr * alpha_sp *
(theta - theta_0): AdamW's own decoupled weight decay, centred on theta_0 instead of 0, at
the parameter's LR. The body has no decay toward zero; the head keeps its ordinary decoupled
weight decay, at `beta` (on the parameters the harness decays: not norms, not biases).
theta_0 is the model as the recipe builds it (its weights, before the first stage).
"""
from __future__ import annotations

import torch

from harness.engine.groups import LayerGroups
from harness.engine.recipe import L2SP


class AdamWSP(torch.optim.AdamW):
    """AdamW whose param groups may carry `alpha_sp` and `anchors` (theta_0 of each of their
    parameters): a decoupled pull toward the anchors before each update."""

    @torch.no_grad()
    def step(self, closure=None):
        for pg in self.param_groups:
            alpha = pg.get("alpha_sp", 0.0)
            if not alpha:
                continue   # alpha_sp 0: not a single operation more than AdamW's
            pairs = [(p, a) for p, a in zip(pg["params"], pg["anchors"]) if p.grad is not None]
            if pairs:
                params, anchors = zip(*pairs)
                torch._foreach_lerp_(list(params), list(anchors), pg["lr"] * alpha)   # p += w (a - p)
        return super().step(closure)


def start_weights(model: LayerGroups) -> dict[str, torch.Tensor]:
    """theta_0: a copy of the body's parameters as they are now, by name."""
    body = [n for members in model.group_members()[:-1] for n, _, _ in members]
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in body}


def l2sp_groups(groups: list[dict], model: LayerGroups, l2sp: L2SP,
                start: dict[str, torch.Tensor]) -> list[dict]:
    """`groups` (groups.param_groups) set for L2-SP: body groups pulled toward `start` with
    alpha_sp and no weight decay, the head's decayed groups at weight decay beta."""
    head = model.n_groups - 1
    names = {id(p): n for n, p in model.named_parameters()}
    for pg in groups:
        if pg["layer_group"] == head:
            pg["weight_decay"] = l2sp.beta if pg["decay"] else 0.0
        else:
            pg.update(weight_decay=0.0, alpha_sp=l2sp.alpha_sp, anchors=[start[names[id(p)]] for p in pg["params"]])
    return groups
