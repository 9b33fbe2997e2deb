"""One nn.Module per architecture. Each takes `input_shape` (C, H, W) and `num_classes` and returns
logits; none knows about datasets or Lightning."""
