"""The benchmark models, real architectures at real sizes, with synthetic batches.

PyTorch: ResNet-50 (torchvision's layout, written out here: torchvision does not install next to the
pinned torch), an LSTM language model with a 33,278-word vocabulary (WikiText-2's) and 512-wide
embedding and decoder, and a small LSTM for quick runs. TensorFlow: Keras' ResNet50.
Each spec says what a step computes, so the results can state it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    framework: str          # "torch" or "tf"
    description: str
    batch: int
    input: str              # what one synthetic batch is, in words
    tensors: int | None = None   # expected parameter tensors (asserted when given)
    params: int | None = None    # expected parameters (asserted when given)


IMAGE = 64  # image side for the CNNs: ResNet-50's full size, small images keep a CPU step short

SPECS = {
    "resnet50": ModelSpec("resnet50", "torch", "ResNet-50 (torchvision layout)", 4,
                          f"4 images 3x{IMAGE}x{IMAGE}, 1000 classes", 161, 25_557_032),
    "lstm-lm": ModelSpec("lstm-lm", "torch", "LSTM LM, vocab 33278, 2x512 LSTM, untied 512-wide "
                         "embedding and decoder", 4, "4 sequences of 20 tokens", 11, 38_312_446),
    "lstm-small": ModelSpec("lstm-small", "torch", "LSTM LM, vocab 8000, 1x128 LSTM, 128-wide "
                            "embedding and decoder", 4, "4 sequences of 20 tokens", 7, 2_188_096),
    "mlp-102": ModelSpec("mlp-102", "torch", "MLP of 51 linear layers (49 of 512x512, a 1024-wide "
                         "input and a 10-way output): many small tensors", 32,
                         "32 vectors of 1024, 10 classes", 102, 13_400_074),
    "keras-resnet50": ModelSpec("keras-resnet50", "tf", "Keras ResNet50 (weights=None)", 4,
                                f"4 images {IMAGE}x{IMAGE}x3, 1000 classes", None, 25_583_592),
    # exchange only (--exchange-only): no model, one 1000x1000 fp32 gradient
    "tensor-1m": ModelSpec("tensor-1m", "torch", "one 1000x1000 tensor (1M entries; exchange only)", 0,
                           "no batch: synthetic gradients", 1, 1_000_000),
}

EXCHANGE_ONLY = {"tensor-1m"}   # specs with shapes but no model to train


def exchange_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(parameter name, shape) of a PyTorch spec's trainable tensors, in ``model.parameters()``
    order, without allocating them (built on the meta device): what ``--exchange-only`` fills with
    synthetic gradients."""
    import torch

    spec = SPECS[name]
    if spec.framework != "torch":
        raise ValueError(f"exchange only runs PyTorch shapes, not {name!r}")
    if name == "tensor-1m":
        return [("weight", (1000, 1000))]
    with torch.device("meta"):
        model, _, _ = torch_model(name)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------- PyTorch
def torch_model(name: str):
    """(model, make_batch, loss_fn) for a PyTorch spec; the model has the spec's tensor and
    parameter counts (checked here, so a wrong architecture cannot produce figures)."""
    import torch
    from torch import nn

    spec = SPECS[name]
    if name == "resnet50":
        model = resnet50(nn)

        def make_batch(gen):
            return (torch.randn(spec.batch, 3, IMAGE, IMAGE, generator=gen),
                    torch.randint(0, 1000, (spec.batch,), generator=gen))

        loss_fn = nn.CrossEntropyLoss()
    elif name in ("lstm-lm", "lstm-small"):
        vocab, width, layers = (33278, 512, 2) if name == "lstm-lm" else (8000, 128, 1)
        model = LanguageModel(nn, vocab, width, layers)

        def make_batch(gen):
            tokens = torch.randint(0, vocab, (spec.batch, 21), generator=gen)
            return tokens[:, :-1], tokens[:, 1:]

        def loss_fn(logits, targets):
            return nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    elif name == "mlp-102":
        layers = [nn.Linear(1024, 512), nn.ReLU()]
        for _ in range(49):
            layers += [nn.Linear(512, 512), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(512, 10))

        def make_batch(gen):
            return (torch.randn(spec.batch, 1024, generator=gen),
                    torch.randint(0, 10, (spec.batch,), generator=gen))

        loss_fn = nn.CrossEntropyLoss()
    else:
        raise ValueError(f"not a PyTorch benchmark model: {name!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    if (len(params), count) != (spec.tensors, spec.params):
        raise AssertionError(f"{name}: {len(params)} tensors / {count} parameters, expected "
                             f"{spec.tensors} / {spec.params}")
    return model, make_batch, loss_fn


def LanguageModel(nn, vocab: int, width: int, layers: int):
    class _LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.lstm = nn.LSTM(width, width, layers, batch_first=True)
            self.decode = nn.Linear(width, vocab)

        def forward(self, tokens):
            hidden, _ = self.lstm(self.embed(tokens))
            return self.decode(hidden)

    return _LM()


def resnet50(nn):
    """ResNet-50 v1.5 (stride in the 3x3 conv), as torchvision builds it: 161 tensors, 25,557,032."""

    class Bottleneck(nn.Module):
        def __init__(self, inplanes, planes, stride):
            super().__init__()
            width, out = planes, planes * 4
            self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or inplanes != out:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                                nn.BatchNorm2d(out))

        def forward(self, x):
            skip = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            return self.relu(self.bn3(self.conv3(y)) + skip)

    class ResNet50(nn.Module):
        def __init__(self, classes=1000):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            stages, inplanes = [], 64
            for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                layer = []
                for b in range(blocks):
                    layer.append(Bottleneck(inplanes, planes, stride if b == 0 else 1))
                    inplanes = planes * 4
                stages.append(nn.Sequential(*layer))
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2048, classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet50()


# -------------------------------------------------------------------------------------- TensorFlow
def tf_model(name: str):
    """(model, (x, y)) for a TF spec: Keras' own ResNet50 (tf-keras under TF_USE_LEGACY_KERAS=1)."""
    import numpy as np
    import tensorflow as tf

    spec = SPECS[name]
    if name != "keras-resnet50":
        raise ValueError(f"not a TensorFlow benchmark model: {name!r}")
    model = tf.keras.applications.ResNet50(weights=None, input_shape=(IMAGE, IMAGE, 3), classes=1000)
    count = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    if count != spec.params:
        raise AssertionError(f"{name}: {count} trainable parameters, expected {spec.params}")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((spec.batch, IMAGE, IMAGE, 3)).astype(np.float32))
    y = tf.constant(rng.integers(0, 1000, spec.batch))
    return model, (x, y)
