"""Models of the project. Any ``nn.Module`` mapping inputs to logits can be a
student or teacher: name it with ``_target_`` (e.g. ``timm.create_model``)."""

from distillery.models.cifar_resnet import resnet8x4, resnet32x4
from distillery.models.small import CNN1D, MLP

__all__ = ["CNN1D", "MLP", "resnet8x4", "resnet32x4"]
