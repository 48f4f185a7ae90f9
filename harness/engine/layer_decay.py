"""Layer-wise LR decay (BEiT, ELECTRA): block i of a model `depth` blocks deep trains at
lr * layer_decay^(depth - i), the head (the top block) at lr.

The blocks are finer than the layer groups (a ViT's 12 blocks, a ResNet's 8 residual blocks):
- timm models: timm's own assignment, as `timm.optim.param_groups_layer_decay` makes it (the
  model's `group_matcher(coarse=False)`, timm's `auto_group_layers` without one); the new
  fastai head is one block above the body's last, where timm's own classifier would sit.
- torchvision archs (no group_matcher): the rules of timm's matchers, read off the module
  tree: a plain `nn.Sequential` of blocks (a ResNet layer, an EfficientNet or ConvNeXt stage)
  gives one block per child; the stem (a run of single layers, or one module) is block 0;
  a module between two stages (ConvNeXt's downsampling) joins the first block of the stage it
  opens, one after the last stage (EfficientNet's 1x1 conv head) joins the last block; the
  head is the top block. resnet18, efficientnet_b0 and convnext_tiny so get the blocks timm
  gives the same architectures (tested; resnet34/50 follow by the same rule).
"""
from __future__ import annotations

from torch import nn

from harness.engine.groups import LayerGroups


def layer_ids(model: LayerGroups) -> dict[str, int]:
    """Each parameter's block (0 the input end, the head the top one), by parameter name."""
    from harness.engine.timm_models import TimmTransferModel
    if isinstance(model, TimmTransferModel):
        return _timm_ids(model)
    return _torchvision_ids(model)


def lr_scales(model: LayerGroups, layer_decay: float) -> dict[str, float]:
    """Each parameter's LR factor, layer_decay^(top block - its block), by parameter name."""
    ids = layer_ids(model)
    top = max(ids.values())
    return {name: layer_decay ** (top - i) for name, i in ids.items()}


def _timm_ids(model) -> dict[str, int]:
    net = model.net
    try:
        from timm.models import group_parameters
        ids = group_parameters(net, net.group_matcher(coarse=False), reverse=True)
    except (AttributeError, NotImplementedError):   # no matcher: what timm falls back to
        from timm.optim import auto_group_layers
        ids = auto_group_layers(net)
    out = {f"net.{n}": i for n, i in ids.items()}
    head = max(out.values()) + 1
    out.update({n: head for n, _ in model.named_parameters() if n not in out})   # the new head
    return out


def _torchvision_ids(model: nn.Sequential) -> dict[str, int]:
    items = _body_items(model)
    stages = [i for i, (is_stage, _) in enumerate(items) if is_stage]
    out: dict[str, int] = {}
    block, pending = -1, []
    for i, (is_stage, parts) in enumerate(items):
        if is_stage:
            for k, part in enumerate(parts):
                block += 1
                _assign(out, [part] + (pending if k == 0 else []), block)
            pending = []
        elif stages and stages[0] < i < stages[-1]:
            pending += parts          # a downsampling layer: opens the next stage's first block
        else:
            if not (stages and i > stages[-1]):
                block += 1            # the stem; after the last stage, a closing conv or norm joins the last block
            _assign(out, parts, block)
    head = len(model) - 1
    _assign(out, [(str(head), model[head])], block + 1)
    return out


def _body_items(model: nn.Sequential) -> list[tuple[bool, list[tuple[str, nn.Module]]]]:
    """The body's parameterised children in order, as (is a stage, [(name, block)]): a stage's
    blocks, or one module (a run of single layers, a stem, kept together)."""
    items: list[tuple[bool, list[tuple[str, nn.Module]]]] = []
    for g, group in enumerate(list(model)[:-1]):
        in_run = False
        for name, child in group.named_children():
            if not _has_params(child):
                continue
            leaf = not any(True for _ in child.children())
            if _is_stage(child):
                items.append((True, [(f"{g}.{name}.{sub}", m) for sub, m in child.named_children() if _has_params(m)]))
            elif leaf and in_run:
                items[-1][1].append((f"{g}.{name}", child))
            else:
                items.append((False, [(f"{g}.{name}", child)]))
            in_run = leaf
    return items


def _assign(out: dict[str, int], parts: list[tuple[str, nn.Module]], block: int) -> None:
    for prefix, m in parts:
        out.update({f"{prefix}.{n}": block for n, _ in m.named_parameters()})


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_stage(m: nn.Module) -> bool:
    """A plain Sequential whose parameterised children are blocks (modules of modules)."""
    if type(m) is not nn.Sequential:
        return False
    return all(any(True for _ in c.children()) for c in m.children() if _has_params(c))
