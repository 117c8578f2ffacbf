"""ResNet for CIFAR-10 (He et al. 2015, 2016): architecture, data, training, evaluation, export."""
