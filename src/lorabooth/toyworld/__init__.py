"""The toy world: a 32 px world with a renderer, a small pretrained model,
judges and the studies calibrated on the DreamBooth paper (research code;
only the dispatch and the demo import it)."""
