"""Recipe models: the ``Classifier`` LightningModule, the YLZ19 teacher-student model and the networks."""

from lightning_ste.recipes.models.classifier import Classifier, load_float_weights
from lightning_ste.recipes.models.lenet5 import LeNet5
from lightning_ste.recipes.models.registry import ARCHITECTURES, build_network
from lightning_ste.recipes.models.resnet_cifar import ResNet20
from lightning_ste.recipes.models.resnet_imagenet import resnet18
from lightning_ste.recipes.models.teacher_student import TeacherStudent, TeacherStudentNet
from lightning_ste.recipes.models.twolayer import TwoLayer
from lightning_ste.recipes.models.vgg import VGG11

__all__ = [
    "ARCHITECTURES",
    "Classifier",
    "LeNet5",
    "ResNet20",
    "TeacherStudent",
    "TeacherStudentNet",
    "TwoLayer",
    "VGG11",
    "build_network",
    "load_float_weights",
    "resnet18",
]
