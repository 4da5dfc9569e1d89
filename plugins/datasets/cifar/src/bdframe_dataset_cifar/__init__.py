"""bdframe datasets: CIFAR-10 and CIFAR-100 in the torchvision folder format."""
