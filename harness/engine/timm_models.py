"""Any timm architecture as a layer-grouped transfer model: `model.arch: timm/<name>`.

Layer groups come from the model's own structure, never from a split written per
architecture: timm's `group_matcher(coarse=True)` orders the body into blocks (stem,
stages or blocks, final norm), and `merge_blocks` cuts that sequence into `groups - 1`
contiguous body groups with as equal a number of blocks as possible (earlier groups take
the extra block). The new head is always the last group.

Why blocks and not parameter counts: channels double stage after stage, so a split
balanced by parameters puts almost the whole network in `early` and leaves `late` with
the last stage alone. Discriminative LRs are about depth (generic early features,
task-specific late ones), and splitting by block count is also what fastai's
hand-written splits do: timm resnet18 (stem, layer1-4) -> stem, layer1, layer2 | layer3,
layer4, and ConvNeXt (stem, 4 stages) -> stem, stages 0-1 | stages 2-3: the torchvision
splits exactly. (timm folds EfficientNet's conv_head into its last stage, 8 blocks, so
there the cut falls one stage earlier than torchvision's features[0:5].)

Heads:
- `fastai` on a model whose features are an NCHW map (CNNs): fastai's head (concat
  pooling, BN, dropout, linear, ...) on `forward_features`; modules only the model's own
  head used (ConvNeXt's head norm) are dropped, as fastai's create_body drops them.
- `fastai` on a model whose features are tokens or NHWC (ViT, Swin and kin): the same
  head without the pooling, on timm's pooled pre-logits (`forward_head(pre_logits=True)`:
  the class token or the token average, after the model's own final norm).
- `linear`: the model's own classifier reset to the new class count (timm's
  `reset_classifier`); it alone is the head group.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.engine.archs import timm_name
from harness.engine.groups import LayerGroups, Member, fastai_head, group_names, is_norm
from harness.engine.input_stats import InputStats
from harness.errors import HarnessError


def merge_blocks(n_blocks: int, n_groups: int) -> list[range]:
    """Cut blocks 0..n_blocks-1 into n_groups contiguous runs of as equal a length as
    possible, the earlier runs one longer when it does not divide."""
    base, extra = divmod(n_blocks, n_groups)
    runs, start = [], 0
    for g in range(n_groups):
        length = base + (1 if g < extra else 0)
        runs.append(range(start, start + length))
        start += length
    return runs


class TimmTransferModel(LayerGroups, nn.Module):
    """A timm model (`net`) and a head, with layer groups given as parameter names."""

    def __init__(self, arch: str, net: nn.Module, head: nn.Module | None, mode: str,
                 layout: "GroupLayout"):
        nn.Module.__init__(self)
        self.arch, self.net, self.mode = arch, net, mode
        self.head = head if head is not None else nn.Identity()
        self._members, self._blocks, self._head_prefix = layout.params, layout.blocks, layout.head_prefix
        if layout.head_prefix == "head.":   # the new head's parameters, now that it is a child
            layout.params[-1] = [f"head.{n}" for n, _ in self.head.named_parameters()]
        self.group_names = group_names(len(layout.params))
        cfg, default = getattr(net, "pretrained_cfg", {}) or {}, InputStats()
        # the statistics of the weights' pretrained config (a body from a checkpoint: its own)
        self.input_stats = InputStats(tuple(cfg.get("mean", default.mean)), tuple(cfg.get("std", default.std)))
        no_wd = getattr(net, "no_weight_decay", None)
        self.no_decay_names = frozenset(f"net.{n}" for n in (no_wd() if callable(no_wd) else ()))
        _check_partition(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_forward(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The NCHW map (fastai head on a map; linear: the map its own head pools), or the
        pooled pre-logits (fastai head on a ViT-like model)."""
        return self.net(x) if self.mode == "pooled" else self.net.forward_features(x)

    def head_forward(self, f: torch.Tensor) -> torch.Tensor:
        # linear: timm's own forward_head (pool, its dropout, the reset classifier), as net(x) runs it
        return self.net.forward_head(f) if self.mode == "linear" else self.head(f)

    def group_members(self) -> list[list[Member]]:
        params = dict(self.named_parameters())
        return [[(n, params[n], is_norm(self.get_submodule(n.rsplit(".", 1)[0]))) for n in names]
                for names in self._members]

    def body_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self._head_prefix)}

    def group_blocks(self) -> list[list[str]]:
        return self._blocks


class GroupLayout:
    """Which parameters (qualified names) and which blocks (labels) each group holds."""

    def __init__(self, params: list[list[str]], blocks: list[list[str]], head_prefix: str):
        self.params, self.blocks, self.head_prefix = params, blocks, head_prefix


def _check_partition(model: TimmTransferModel) -> None:
    seen = [n for names in model._members for n in names]
    every = [n for n, _ in model.named_parameters()]
    if sorted(seen) != sorted(every):   # a bug here would silently freeze or skip parameters
        missing = sorted(set(every) - set(seen)) or sorted(set(seen) - set(every))
        raise RuntimeError(f"{model.arch}: layer groups do not partition the parameters ({missing[:3]})")


def build_timm(arch: str, n_classes: int, weights: str, head: str, groups: int,
               image_size: int | None) -> TimmTransferModel:
    """timm/<name> with a new head for `n_classes`, cut into `groups` layer groups."""
    name = timm_name(arch)
    net = _create(name, weights, image_size, num_classes=n_classes if head == "linear" else 0)
    size = image_size or _default_size(net)
    if head == "linear":
        _probe(net, size, arch, grad=False)
        mode, new_head = "linear", None
        cls = net.get_classifier()
        head_path = next(n for n, m in net.named_modules() if m is cls)
        head_prefix = f"net.{head_path}."
    else:
        feats = _probe(net, size, arch, grad=True, features=True)
        if feats.ndim == 4 and getattr(net, "output_fmt", "NCHW") in ("NCHW", None):
            mode = "map"
            feats.float().sum().backward()   # which parameters the features depend on
            net.reset_classifier(0, "")
            _drop_unused(net)
            new_head = fastai_head(feats.shape[1], n_classes)
        else:
            mode = "pooled"
            del feats
            pooled = _probe(net, size, arch, grad=False)
            new_head = fastai_head(pooled.shape[-1], n_classes, pool=False)
        head_prefix = "head."
    layout = _layout(net, arch, groups, head_prefix)
    return TimmTransferModel(arch, net, new_head, mode, layout)


def _create(name: str, weights: str, image_size: int | None, **kwargs) -> nn.Module:
    import timm
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:   # an unknown pretrained tag
        raise HarnessError(f"model.arch: timm has no pretrained tag '{name}'") from None
    if image_size and cfg is not None and cfg.fixed_input_size:   # ViT-like: position embeddings for this size
        kwargs["img_size"] = image_size
    if weights == "imagenet":
        from harness.engine.timm_weights import pretrained_net
        return pretrained_net(name, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def _default_size(net: nn.Module) -> int:
    return int((getattr(net, "pretrained_cfg", {}) or {}).get("input_size", (3, 224, 224))[-1])


def _probe(net: nn.Module, size: int, arch: str, grad: bool, features: bool = False) -> torch.Tensor:
    """One forward on 2 random images (its own generator: the global RNG is untouched), in
    eval mode; with `grad`, the output keeps its graph, so a backward from it shows
    `_drop_unused` which parameters the features depend on."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = net.training
    net.eval()
    try:
        with torch.set_grad_enabled(grad):
            out = net.forward_features(x) if features else net(x)
    except RuntimeError as e:
        raise HarnessError(f"data.image_size: {size} px does not fit {arch} "
                           f"({str(e).splitlines()[0][:120]})") from None
    finally:
        net.train(was_training)
    return out if grad else out.detach()


def _drop_unused(net: nn.Module) -> None:
    """Replace each module none of whose parameters got a gradient in the probe (the
    model's own head, unused under the fastai head) by an Identity; clear the grads."""
    def unused(m: nn.Module) -> bool:
        ps = list(m.parameters())
        return bool(ps) and all(p.grad is None for p in ps)
    for name, module in list(net.named_children()):
        if unused(module):
            setattr(net, name, nn.Identity())
        else:
            _drop_unused(module)
    for p in net.parameters():
        p.grad = None


def _coarse_blocks(net: nn.Module, skip_prefix: str) -> list[list[str]]:
    """The body's ordered blocks as lists of parameter names (qualified from the model)."""
    from timm.models import group_parameters
    try:
        matcher = net.group_matcher(coarse=True)
        grouped = group_parameters(net, matcher)
        blocks = [[f"net.{n}" for n in names] for _, names in sorted(grouped.items())]
    except (AttributeError, NotImplementedError):   # no matcher: the top-level children, in order
        blocks = [[f"net.{child}.{n}" for n, _ in m.named_parameters()] for child, m in net.named_children()]
    blocks = [[n for n in b if not n.startswith(skip_prefix)] for b in blocks]
    return [b for b in blocks if b]


def _label(names: list[str]) -> str:
    """A block's modules by name: 'layer1', 'blocks.3', 'stages.0', or 'conv1, bn1' for a
    stem of several (a module's first name, and its index when it is a numbered list)."""
    labels: list[str] = []
    for n in names:
        parts = n.removeprefix("net.").split(".")
        label = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        if label not in labels:
            labels.append(label)
    return ", ".join(labels)


def _layout(net: nn.Module, arch: str, groups: int, head_prefix: str) -> GroupLayout:
    blocks = _coarse_blocks(net, head_prefix)
    if groups - 1 > len(blocks):
        raise HarnessError(f"model.groups: {groups} asks for {groups - 1} body groups, but {arch} has "
                           f"{len(blocks)} blocks (at most {len(blocks) + 1} groups with the head)")
    params, labels = [], []
    for run in merge_blocks(len(blocks), groups - 1):
        params.append([n for b in run for n in blocks[b]])
        labels.append([_label(blocks[b]) for b in run])
    if head_prefix == "head.":
        head_params = []   # filled by the model: its head module's parameters
    else:
        head_params = [f"net.{n}" for n, _ in net.named_parameters() if f"net.{n}".startswith(head_prefix)]
    params.append(head_params)
    labels.append(["head (new)" if head_prefix == "head." else f"{head_prefix.removeprefix('net.').rstrip('.')} (reset)"])
    return GroupLayout(params, labels, head_prefix)
