"""fastguide's loop in place of diffusers pipelines' own: which sampler settings reproduce a scheduler."""
