"""torchvision classification models, random init (``weights=None``), with a random image batch.

The model is built on the target device in fp32 (torchvision's initialisers), then cast to the
requested dtype; BatchNorm running statistics are cast with it. Dropout stays at torchvision's
defaults. GoogLeNet and Inception-v3 keep their auxiliary classifiers (as in training), and the
loss adds them with the weights of their training recipes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision

from memprof.models.base import BuiltModel, ModelOptions, move_batch

SEED = 0
# Auxiliary-classifier loss weights: 0.3 as stated in the GoogLeNet paper (Szegedy et al. 2015);
# 0.4 as in TF-slim's Inception-v3 training code.
AUX_WEIGHTS = {"googlenet": 0.3, "inception_v3": 0.4}


def build(name: str, options: ModelOptions, device: torch.device) -> BuiltModel:
    """Build torchvision model ``name`` with ``options.num_classes`` (default 1000) classes."""
    kwargs: dict[str, object] = {"weights": None}
    if options.num_classes is not None:
        kwargs["num_classes"] = options.num_classes
    if name.startswith("vit_"):  # position embeddings are sized for one image size
        kwargs["image_size"] = options.image_size
    elif name == "maxvit_t":  # its attention grids are sized for one input size
        kwargs["input_size"] = (options.image_size, options.image_size)
    elif name in AUX_WEIGHTS:  # torchvision's future default; silences its FutureWarning
        kwargs["init_weights"] = True
    with torch.device(device):
        model = torchvision.models.get_model(name, **kwargs)
    model.to(options.torch_dtype).train()
    num_classes = options.num_classes or 1000
    gen = torch.Generator().manual_seed(SEED)
    batch = {
        "pixel_values": torch.randn(options.batch_size, 3, options.image_size, options.image_size, generator=gen),
        "labels": torch.randint(0, num_classes, (options.batch_size,), generator=gen),
    }
    aux_weight = AUX_WEIGHTS.get(name, 0.0)

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return classification_loss(model, batch, aux_weight)

    record = {"builder": f"torchvision.models.get_model({name!r}, weights=None)", "num_classes": num_classes,
              "image_size": options.image_size, "aux_loss_weight": aux_weight}
    return BuiltModel(name=name, family="torchvision", model=model,
                      batch=move_batch(batch, device, options.torch_dtype), loss=loss, config=record)


def classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], aux_weight: float = 0.0) -> torch.Tensor:
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
