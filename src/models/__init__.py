"""One nn.Module per architecture. Each takes `input_shape` (C, H, W) and `num_classes` and returns
logits; none knows about datasets or Lightning. Their settings (widths, dropout) have no defaults here:
conf/model/*.yaml is the one place they are written."""
