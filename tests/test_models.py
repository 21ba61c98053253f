"""hf_longtail.models: the CIFAR ResNets and the model factory (all offline, tiny models)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from hf_longtail.models import (
    ResNetCifarConfig,
    ResNetCifarForImageClassification,
    create_image_processor,
    create_model,
    is_model,
    list_models,
    register_model,
    resolve_labels,
)

LOGGER = "hf_longtail.models.factory"


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _state_equal(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if not k.startswith(skip)]
    return all(torch.equal(sa[k], sb[k]) for k in keys)


# ------------------------------------------------------------------ CIFAR ResNet
# Published parameter counts of the CIFAR ResNets (He et al. 2016; akamaster / LDAM-DRW code),
# 10 classes, linear head.
PUBLISHED = {"resnet20_cifar": 269_722, "resnet32_cifar": 464_154, "resnet44_cifar": 658_586,
             "resnet56_cifar": 853_018, "resnet110_cifar": 1_727_962}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_resnet_cifar_parameter_counts_match_published(name):
    assert _n_params(create_model(name, num_labels=10)) == PUBLISHED[name]


def test_resnet32_parameter_count_by_formula_and_head_variants():
    def conv(cin, cout, k=3):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    n, w = 5, (16, 32, 64)
    body = conv(3, 16) + bn(16)
    cin = 16
    for c in w:
        for _ in range(n):
            body += conv(cin, c) + bn(c) + conv(c, c) + bn(c)
            cin = c
    assert _n_params(create_model("resnet32_cifar", 10)) == body + 64 * 10 + 10 == 464_154
    # LDAM's NormedLinear head: weight (64, K), no bias
    assert _n_params(create_model("resnet32_cifar", 10, normed_linear=True)) == body + 640
    # option-B shortcuts add two 1x1 conv + BN projections (16->32, 32->64)
    extra = conv(16, 32, 1) + bn(32) + conv(32, 64, 1) + bn(64)
    assert _n_params(create_model("resnet32_cifar", 10, shortcut="B")) == 464_154 + extra


class _LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _LDAMBlock(nn.Module):
    """LDAM-DRW's BasicBlock with option-A shortcut, written independently for the test."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = _LambdaLayer(
                lambda x: F.pad(
                    x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0
                )
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _LDAMResNet32(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, c in enumerate((16, 32, 64)):
            blocks = []
            for j in range(5):
                blocks.append(_LDAMBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, k)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3]).view(out.size(0), -1)
        return self.linear(out)


def test_resnet32_matches_ldam_reference_forward():
    ours = create_model("resnet32_cifar", 10)
    ref = _LDAMResNet32(10)
    sa, sb = ours.state_dict(), ref.state_dict()
    assert [v.shape for v in sa.values()] == [v.shape for v in sb.values()]  # same layout/order
    ref.load_state_dict(dict(zip(sb.keys(), sa.values())))
    x = torch.randn(4, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(ref, mode)()
        torch.testing.assert_close(ours(x).logits, ref(x), rtol=1e-5, atol=1e-5)


def test_resnet_cifar_init_is_ldam_kaiming():
    torch.manual_seed(0)
    m = create_model("resnet32_cifar", 100)
    convs = [
        mod.weight for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.in_channels == 64
    ]
    w = torch.cat([c.flatten() for c in convs])
    # kaiming_normal_ (fan_in, gain sqrt(2)): std = sqrt(2 / (64 * 9)), ~300k samples
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.02)
    assert m.classifier.weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.05)
    assert m.classifier.bias.abs().max().item() <= 1 / 8  # PyTorch default bound 1/sqrt(64)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    normed = create_model("resnet32_cifar", 7, normed_linear=True)
    torch.testing.assert_close(normed.classifier.weight.norm(dim=0), torch.ones(7))


def test_resnet_cifar_forward_outputs_and_loss():
    m = create_model("resnet20_cifar", 5)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    out = m(x, labels=y, output_hidden_states=True)
    assert isinstance(out, ImageClassifierOutputWithNoAttention)
    assert out.logits.shape == (3, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y))
    assert [h.shape[1:] for h in out.hidden_states] == [
        (16, 32, 32),
        (16, 32, 32),
        (32, 16, 16),
        (64, 8, 8),
    ]
    loss, logits = m(x, labels=y, return_dict=False)
    torch.testing.assert_close((loss, logits), (out.loss, out.logits))
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x, labels=y).loss.dtype == torch.float32
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 1, 32, 32))


def test_resnet_cifar_config_validation():
    with pytest.raises(ValueError, match="equal"):
        ResNetCifarConfig(num_blocks=[5, 5], widths=[16, 32, 64])
    with pytest.raises(ValueError, match="decrease"):
        ResNetCifarConfig(widths=[64, 32, 16])
    with pytest.raises(ValueError, match="shortcut"):
        ResNetCifarConfig(shortcut="C")


@pytest.mark.parametrize("normed_linear", [False, True])
def test_resnet_cifar_save_load_roundtrip_via_auto_classes(tmp_path, normed_linear):
    m = create_model("resnet32_cifar", id2label=["cat", "dog", "emu"], normed_linear=normed_linear)
    with torch.no_grad():  # trained-looking weights: non-unit classifier columns, moved BN stats
        m.classifier.weight.mul_(torch.linspace(0.5, 2.0, m.classifier.weight.shape[-1]))
        m.train()(torch.randn(8, 3, 32, 32))
    m.eval().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, ResNetCifarConfig) and cfg.normed_linear == normed_linear
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ResNetCifarForImageClassification)
    assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "emu"}
    assert _state_equal(m, loaded)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x).logits, loaded(x).logits, rtol=0, atol=0)


def test_trainer_scales_resnet_cifar_loss_for_gradient_accumulation(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = create_model("resnet20_cifar", 4)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    # forward(**kwargs) would otherwise make the Trainer pass num_items_in_batch and skip the
    # division by gradient_accumulation_steps, inflating accumulated gradients.
    assert Trainer(model=model, args=args).model_accepts_loss_kwargs is False


# ------------------------------------------------------------------ factory: checkpoints
def _tiny_vit(num_labels=10):
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=37, num_labels=num_labels)  # fmt: skip
    return ViTForImageClassification(cfg)


def _tiny_resnet(num_labels=10):
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                       num_labels=num_labels)  # fmt: skip
    return ResNetForImageClassification(cfg)


@pytest.mark.parametrize("builder", [_tiny_vit, _tiny_resnet], ids=["vit", "resnet"])
def test_local_checkpoint_gets_resized_head_and_labels(tmp_path, caplog, builder):
    src = builder(10)
    src.save_pretrained(tmp_path)
    names = ["w", "x", "y", "z"]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = create_model(str(tmp_path), num_labels=4, id2label=names)
    assert "10 -> 4" in caplog.text and "re-initialized" in caplog.text
    assert type(m) is type(src)
    assert m.config.num_labels == 4
    assert m.config.id2label == dict(enumerate(names))
    assert m.config.label2id == {n: i for i, n in enumerate(names)}
    head = [
        p for n, p in m.named_parameters() if n.startswith("classifier") and n.endswith("weight")
    ]
    assert head[0].shape[0] == 4
    assert _state_equal(src, m, skip=("classifier",))  # backbone loaded, not re-initialized
    assert m(torch.randn(2, 3, 32, 32)).logits.shape == (2, 4)


def test_local_checkpoint_same_size_keeps_head_without_warning(tmp_path, caplog):
    src = _tiny_vit(3)
    src.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = create_model(tmp_path, id2label={"0": "a", "1": "b", "2": "c"})
    assert "re-initialized" not in caplog.text
    assert _state_equal(src, m)
    assert m.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_local_checkpoint_pretrained_false_is_random_same_architecture(tmp_path):
    src = _tiny_vit(10)
    src.save_pretrained(tmp_path)
    m = create_model(tmp_path, num_labels=10, pretrained=False)
    assert type(m) is type(src) and _n_params(m) == _n_params(src)
    assert not torch.equal(m.vit.embeddings.patch_embeddings.projection.weight,
                           src.vit.embeddings.patch_embeddings.projection.weight)  # fmt: skip


def test_resnet_cifar_checkpoint_through_factory_resizes_head(tmp_path, caplog):
    src = create_model("resnet20_cifar", 10)
    src.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = create_model(tmp_path, num_labels=100)
    assert "10 -> 100" in caplog.text
    assert isinstance(m, ResNetCifarForImageClassification) and m.classifier.out_features == 100
    assert _state_equal(src, m, skip=("classifier",))


# ------------------------------------------------------------------ factory: configs
def test_from_config_dict_and_object_do_not_mutate_input():
    d = {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37, "num_labels": 9}  # fmt: skip
    m = create_model(d, num_labels=3, id2label=["a", "b", "c"])
    assert isinstance(m, ViTForImageClassification) and m.config.num_labels == 3
    assert d["num_labels"] == 9
    assert create_model(d).config.num_labels == 9  # no labels given: the dict's own
    cfg = ResNetCifarConfig(num_blocks=[1, 1, 1], num_labels=10)
    m = create_model(cfg, num_labels=4)
    assert isinstance(m, ResNetCifarForImageClassification) and m.classifier.out_features == 4
    assert cfg.num_labels == 10
    with pytest.raises(ValueError, match="model_type"):
        create_model({"image_size": 32}, 3)


# ------------------------------------------------------------------ factory: timm
@pytest.mark.parametrize("name", ["timm:test_resnet", "timm/test_resnet.r160_in1k", "test_resnet"])
def test_timm_architecture_forward_and_roundtrip(tmp_path, name):
    from transformers import TimmWrapperForImageClassification, TimmWrapperImageProcessor

    m = create_model(name, num_labels=5, id2label=list("abcde"), pretrained=False).eval()
    assert isinstance(m, TimmWrapperForImageClassification)
    x = torch.randn(2, 3, 64, 64)
    assert m(x).logits.shape == (2, 5)
    m.save_pretrained(tmp_path)
    loaded = create_model(tmp_path).eval()  # local dir, head kept
    assert isinstance(loaded, TimmWrapperForImageClassification)
    assert loaded.config.id2label == dict(enumerate("abcde"))
    torch.testing.assert_close(m(x).logits, loaded(x).logits, rtol=0, atol=0)
    proc = create_image_processor(tmp_path)  # from config.json's pretrained_cfg, offline
    assert isinstance(proc, TimmWrapperImageProcessor)
    assert proc.data_config["input_size"] == (3, 160, 160)
    assert isinstance(create_image_processor(name, m), TimmWrapperImageProcessor)


def test_download_options_never_leak_into_configs(tmp_path):
    hub = {"revision": "main", "cache_dir": str(tmp_path / "cache"), "token": None}
    for name in ("timm:test_resnet", "resnet20_cifar"):
        m = create_model(name, num_labels=3, pretrained=False, **hub)
        assert not any(hasattr(m.config, k) for k in ("revision", "cache_dir", "token")), name
    _tiny_vit(3).save_pretrained(tmp_path / "vit")
    m = create_model(tmp_path / "vit", num_labels=3, **hub)
    assert "revision" not in m.config.to_dict()


def test_timm_pretrained_offline_fails_clearly_instead_of_random_weights(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        create_model("timm:test_vit", num_labels=3, pretrained=True)
    message = str(info.value)
    assert "test_vit" in message and "offline" in message
    assert "pretrained=False" in message and "--no_pretrained" in message
    # Opting out on purpose still builds the architecture.
    m = create_model("timm:test_vit", num_labels=3, pretrained=False)
    assert m(torch.randn(1, 3, 160, 160)).logits.shape == (1, 3)


def test_pretrained_source_names_only_weights_that_are_loaded(tmp_path):
    from hf_longtail.models import pretrained_source

    assert pretrained_source("resnet32_cifar") is None
    assert pretrained_source("timm/test_vit", pretrained=False) is None
    assert pretrained_source("timm/test_vit").startswith("timm/test_vit")
    assert pretrained_source("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    assert pretrained_source({"model_type": "vit"}) is None
    assert pretrained_source(str(tmp_path)) == str(tmp_path.resolve())


def test_timm_pretrained_weights_are_copied_when_available(monkeypatch, caplog):
    import timm

    real_create = timm.create_model
    sources = []

    def fake_create(arch, pretrained=False, **kw):
        model = real_create(arch, pretrained=False, **kw)
        if pretrained:  # stands in for the downloaded checkpoint: recognisable weights
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    p.fill_(0.001 * (i + 1))
            sources.append(model)
        return model

    monkeypatch.setattr(timm, "create_model", fake_create)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = create_model("timm:test_resnet", num_labels=7, pretrained=True)
    assert len(sources) == 1
    assert _state_equal(sources[0], m.timm_model)
    assert "1000 -> 7" in caplog.text


# ------------------------------------------------------------------ factory: errors, registry
def test_offline_hub_id_error_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="offline") as err:
        create_model("google/vit-base-patch16-224-not-cached", num_labels=3)
    assert "local directory" in str(err.value)


def test_unknown_names_and_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"Did you mean \['resnet32_cifar'") as err:
        create_model("resnet32cifar", 10)
    assert "timm" in str(err.value) and "resnet110_cifar" in str(err.value)
    with pytest.raises(ValueError, match=r"config\.json"):
        create_model(tmp_path, 10)  # empty dir
    with pytest.raises(ValueError, match="num_labels"):
        create_model("resnet32_cifar")
    with pytest.raises(ValueError, match="not an architecture"):
        create_model("timm:definitely_not_a_timm_model", 3)
    with pytest.raises(ValueError, match="2 entries"):
        resolve_labels(3, ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        resolve_labels(2, ["a", "a"])
    with pytest.raises(ValueError, match="inverse"):
        resolve_labels(2, ["a", "b"], {"a": 1, "b": 0})
    with pytest.raises(TypeError, match="name_or_path"):
        create_model(42, 3)


def test_registry_and_image_processors(tmp_path):
    assert list_models("resnet*_cifar") == sorted(PUBLISHED)
    assert is_model("resnet32_cifar") and not is_model("nope")
    calls = {}

    @register_model(name="tiny_test_net")
    def _entry(num_labels, id2label, label2id, pretrained, **kwargs):
        calls.update(num_labels=num_labels, id2label=id2label, pretrained=pretrained, **kwargs)
        return create_model("resnet20_cifar", num_labels, id2label=id2label)

    m = create_model("tiny_test_net", id2label=["a", "b"], pretrained=False, extra=1)
    assert calls == {"num_labels": 2, "id2label": {0: "a", 1: "b"}, "pretrained": False, "extra": 1}
    assert m.classifier.out_features == 2 and "tiny_test_net" in list_models()
    assert create_image_processor("resnet32_cifar") is None
    # a checkpoint dir with and without a saved image processor
    _tiny_vit(3).save_pretrained(tmp_path)
    assert create_image_processor(tmp_path) is None
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    proc = create_image_processor(tmp_path)
    assert isinstance(proc, ViTImageProcessor) and proc.size["height"] == 32
