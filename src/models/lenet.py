from collections.abc import Sequence

from src.models.cnn2 import CNN2


class LeNet(CNN2):
    """The MNIST seed's LeNet-style CNN: conv 6 and 16 (3x3, each then 2x2 max-pool), fully connected
    120-84. It is CNN2's shape with LeNet's widths: 60,074 parameters on 28x28 grayscale, 10 classes."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(input_shape, num_classes, channels=channels, hidden=hidden, dropout=dropout)
