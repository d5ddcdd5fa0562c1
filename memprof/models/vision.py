"""torchvision classification models, random init (``weights=None``), with a random image batch.

The model is built on the target device in fp32 (torchvision's initialisers), then cast to the
requested dtype; BatchNorm running statistics are cast with it. Dropout stays at torchvision's
defaults. GoogLeNet and Inception-v3 keep their auxiliary classifiers (as in training), and the
loss adds them with the weights of their training recipes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torchvision
from torch.overrides import TorchFunctionMode

from memprof.errors import UsageError
from memprof.models.base import SEED, BuiltModel, ModelOptions, move_batch, outside_dispatch_modes, place

# Auxiliary-classifier loss weights: 0.3 as stated in the GoogLeNet paper (Szegedy et al. 2015);
# 0.4 as in TF-slim's Inception-v3 training code.
AUX_WEIGHTS = {"googlenet": 0.3, "inception_v3": 0.4}
# Inception-v3's auxiliary head needs a 17x17 Mixed_6e map, i.e. 299-pixel images (its native size).
MIN_IMAGE_SIZE = {"inception_v3": 299}


def build(name: str, options: ModelOptions, device: torch.device, weights_on_meta: bool = False) -> BuiltModel:
    """Build torchvision model ``name`` with ``options.num_classes`` (default 1000) classes;
    ``weights_on_meta`` as ``memprof.models.build_model``'s."""
    if options.image_size < MIN_IMAGE_SIZE.get(name, 1):
        raise UsageError(f"Invalid image_size: {options.image_size} ({name} needs at least {MIN_IMAGE_SIZE[name]})")
    kwargs: dict[str, object] = {"weights": None}
    if options.num_classes is not None:
        kwargs["num_classes"] = options.num_classes
    if name.startswith("vit_"):  # position embeddings are sized for one image size
        kwargs["image_size"] = options.image_size
    elif name == "maxvit_t":  # its attention grids are sized for one input size
        kwargs["input_size"] = (options.image_size, options.image_size)
    elif name in AUX_WEIGHTS:  # the current default, said explicitly to silence torchvision's FutureWarning
        kwargs["init_weights"] = True
    model_device = torch.device("meta") if weights_on_meta else device
    with outside_dispatch_modes(weights_on_meta):
        with _EmptyTensorsOnMeta() if model_device.type == "meta" else torch.device(device):
            model = torchvision.models.get_model(name, **kwargs)
        place(model, model_device, options.torch_dtype).train()
    num_classes = options.num_classes or 1000
    gen = torch.Generator().manual_seed(SEED)
    batch = {
        "pixel_values": torch.randn(options.batch_size, 3, options.image_size, options.image_size, generator=gen),
        "labels": torch.randint(0, num_classes, (options.batch_size,), generator=gen),
    }
    aux_weight = AUX_WEIGHTS.get(name, 0.0)
    record = {"builder": f"torchvision.models.get_model({name!r}, weights=None)", "num_classes": num_classes,
              "image_size": options.image_size, "aux_loss_weight": aux_weight}
    return BuiltModel(name=name, family="torchvision", model=model,
                      batch=move_batch(batch, device, options.torch_dtype),
                      loss=functools.partial(classification_loss, aux_weight=aux_weight), config=record)


class _EmptyTensorsOnMeta(TorchFunctionMode):
    """``torch.device("meta")`` for tensors made without data (parameters, buffers), while tensors
    computed from values (``arange`` …) stay on the CPU: RegNet's builder reads its block widths
    back with ``tolist()``, which meta tensors cannot do. The few small CPU buffers this leaves
    (Swin's relative-position indices) are moved to meta with the model afterwards.
    """

    FACTORIES = frozenset({torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full,
                           torch.rand, torch.randn})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                        aux_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the logits (in fp32), plus ``aux_weight`` times each auxiliary head's."""
    out = model(batch["pixel_values"])
    labels = batch["labels"]
    if isinstance(out, torch.Tensor):
        return F.cross_entropy(out.float(), labels)
    main, *aux = out  # GoogLeNetOutputs / InceptionOutputs in train mode
    loss = F.cross_entropy(main.float(), labels)
    for logits in aux:
        if logits is not None:
            loss = loss + aux_weight * F.cross_entropy(logits.float(), labels)
    return loss
