"""
fp16 training (--dtype float16: the auto dtype on CUDA GPUs without bf16), set up by one call
before a stage's loop, so that the loop stays backward / clip / optimizer.step() whatever the
dtype. fp16's smallest normal number is 6e-5: the gradients of small activations underflow to
zero. So the gradient that enters the network at its logits is multiplied by `scale` (as if
the loss were), each parameter's gradient is divided by it as it arrives (the weights are
fp32: nothing is lost there), and an optimizer step whose gradient overflowed (inf or NaN) is
skipped while the scale halves; after `growth_interval` good steps in a row it doubles. The
rule of torch.amp.GradScaler, applied through hooks instead of calls in the loop.
"""

import torch


class LossScaling:
    """Dynamic loss scaling of `model` trained by `optimizer` (hooks on the logits and on every
    trainable parameter; optimizer.step skips a step whose gradient is not finite)."""

    def __init__(self, model, optimizer, scale=2.0**16, growth_interval=2000):
        self.scale, self.growth_interval, self.good, self.skipped = scale, growth_interval, 0, 0
        self.optimizer, self.real_step = optimizer, optimizer.step
        model.lm_head.register_forward_hook(self.scale_logits)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(self.unscale)
        optimizer.step = self.step

    def scale_logits(self, module, inputs, logits):
        if logits.requires_grad:  # a training forward: its gradient flows back scaled
            logits.register_hook(lambda g: g * self.scale)

    def unscale(self, grad):
        return grad / self.scale

    def step(self, *args, **kwargs):
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        if all(bool(torch.isfinite(g).all()) for g in grads if g is not None):
            self.good += 1
            if self.good % self.growth_interval == 0:
                self.scale *= 2.0
            return self.real_step(*args, **kwargs)
        self.scale, self.good, self.skipped = self.scale / 2.0, 0, self.skipped + 1
        return None
