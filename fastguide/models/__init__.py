"""Models: nn modules over fastguide.ops, ADM's UNet and classifier, DiT/SiT, their presets
and checkpoints, ``accelerate()`` for existing UNets and DiTs, and adapters to fastguide's
model call."""
