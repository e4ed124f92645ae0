"""Models: nn modules over fastguide.ops, ADM's UNet and classifier, their presets and
checkpoints, ``accelerate()`` for existing UNets, and adapters to fastguide's model call."""
