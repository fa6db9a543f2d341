"""The time of one training step with each activation, for ``fastrelu bench``: what share of a
step the choice of activation costs.

Two models: the MLP of ``fastrelu experiment`` (2x100, SGD with momentum, batch 32 of 64
features) on fastrelu's kernels, and a small PyTorch CNN on PyTorch's own modules
(conv -> activation -> conv -> activation -> linear).  Every step of one model is timed in the
interleaved rounds of the report, and each is reported over the step with ReLU.
"""
import numpy as np

from ._report import PASSES, measure_groups

MLP_BATCH, MLP_FEATURES, MLP_CLASSES = 32, 64, 10  # the experiment's batch, on digits' 8x8 pixels
CNN_BATCH, CNN_CHANNELS, CNN_SIDE, CNN_CLASSES = 32, 8, 16, 10


def mlp_steps():
    """{activation: one training step} of the experiment's MLP, on a fixed random batch."""
    from . import nn
    from .experiment import ACTIVATIONS, CONFIGS, build

    rng = np.random.default_rng(0)
    x = rng.random((MLP_BATCH, MLP_FEATURES), dtype=np.float32)
    y = rng.integers(0, MLP_CLASSES, MLP_BATCH)
    config = CONFIGS["mlp"]
    steps = {}
    for name in ACTIVATIONS:
        model = build(config, name, MLP_FEATURES, MLP_CLASSES, seed=0)
        loss = nn.SoftmaxCrossEntropy()
        opt = nn.SGD(model.parameters(), lr=config["lr"], momentum=0.9)

        def step(model=model, loss=loss, opt=opt):
            loss.forward(model.forward(x), y)
            model.backward(loss.backward())
            opt.step()

        steps[name] = step
    return steps


def cnn_activations():
    """{name: (first activation, second activation)} as module factories of a channel count;
    the last is the mixed model, PReLU after the first convolution, Leaky ReLU after the
    second."""
    import torch

    relu, leaky = (lambda c: torch.nn.ReLU()), (lambda c: torch.nn.LeakyReLU(0.01))
    prelu, elu = (lambda c: torch.nn.PReLU(c)), (lambda c: torch.nn.ELU(1.0))
    return {"relu": (relu, relu), "leaky_relu": (leaky, leaky), "prelu": (prelu, prelu),
            "elu": (elu, elu), "prelu, leaky_relu": (prelu, leaky)}


def cnn_steps():
    """{activations: one training step} of conv(3->8, 3x3) -> act -> conv(8->8, 3x3) -> act
    -> linear on a fixed random batch of 32 3x16x16 images, SGD with momentum."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(CNN_BATCH, 3, CNN_SIDE, CNN_SIDE)
    y = torch.randint(0, CNN_CLASSES, (CNN_BATCH,))
    c = CNN_CHANNELS
    steps = {}
    for name, (first, second) in cnn_activations().items():
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 3, padding=1), first(c),
            torch.nn.Conv2d(c, c, 3, padding=1), second(c),
            torch.nn.Flatten(), torch.nn.Linear(c * CNN_SIDE * CNN_SIDE, CNN_CLASSES))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        steps[name] = step
    return steps


def training_steps(peers, timing):
    """[{model, description, seconds per step by activation, ratios over ReLU's step}]: the
    MLP always, the CNN when PyTorch is installed, measured in passes over both."""
    models = [("mlp", f"fastrelu experiment MLP 2x100, batch {MLP_BATCH} of {MLP_FEATURES} "
               "features, fastrelu.nn", mlp_steps())]
    if "torch" in peers:
        models.append(("cnn", f"PyTorch conv-act-conv-act-linear, {CNN_CHANNELS} channels, "
                       f"batch {CNN_BATCH} of 3x{CNN_SIDE}x{CNN_SIDE}, torch.nn", cnn_steps()))
    groups = [(steps, {name: (name, "relu") for name in steps if name != "relu"})
              for _, _, steps in models]
    return [{"model": model, "description": description, "seconds": m.seconds,
             "ratios": m.ratios, "rounds": m.rounds, "attempts": m.attempts}
            for (model, description, _), m in zip(models, measure_groups(groups, timing, PASSES))]
