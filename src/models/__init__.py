"""One nn.Module per architecture, (`input_shape`, `num_classes`) -> logits; settings only in conf/model/*.yaml."""
