"""The training step, written once: forward, hand-written backward, clipping, update.

Every step handprop takes goes through forward_backward and clip_and_update: the eager step
below calls them op by op, and compiled.CompiledStep traces these same two functions into one
graph. Both steps answer the same call, chosen once per run (as World/Ranks and
Diagnostics/NoDiagnostics are), so the training loop has no branch on it:

    loss, agreed = step(rows, lr, stop)

rows (B,) are the global batch's rows of the split's Examples (Examples.draw), lr the step's
learning rate (the optimiser turns it into its numbers), stop whether a stop was asked for; loss
is the batch's mean loss (a float, read on the host), agreed whether any rank asked to stop.
"""

from .diagnostics import NoDiagnostics
from .distributed import ALONE
from .optim import clip_grad_norm, make_schedule
from .packing import pack, real_positions

NO_DIAGNOSTICS = NoDiagnostics()


def schedule_for(config):
    """The learning rate at each step of a run of config (a TrainConfig), as a function step -> lr."""
    return make_schedule(config.schedule, config.max_steps, config.lr, config.lr_decay_at, config.warmup,
                         config.min_lr)


def forward_backward(model, criterion, X, Y, share=1.0):
    """The batch's loss (0-d tensor); every gradient computed by hand into model.grads, weighted by share (the
    weight of this process's rows in the global batch's mean loss)."""
    loss = criterion.forward(model.forward(X), Y)
    model.backward(criterion.backward(share))
    return loss


def clip_and_update(model, optimizer, grad_clip, numbers, diagnostics=NO_DIAGNOSTICS):
    """Clip the gradients' global norm to grad_clip (0: no clipping), then update the parameters in place with the
    optimiser's numbers for this step (optimizer.next_numbers); diagnostics sees the gradients the update gets."""
    if grad_clip:
        clip_grad_norm(model.grads, grad_clip)
    diagnostics.after_backward()
    optimizer.update(model.grads, *numbers)


class EagerStep:
    """The step op by op: this process's rows of the batch, forward and backward by hand, the gradients summed over
    world's ranks (with the loss and the stop requests), clipping, the update; diagnostics record as it goes."""

    def __init__(self, model, optimizer, criterion, examples, grad_clip, world=ALONE, diagnostics=NO_DIAGNOSTICS):
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.examples = examples            # the training split (data.Examples) the rows index
        self.grad_clip = grad_clip          # the global gradient norm clipped to; 0: none
        self.world = world                  # the ranks sharing each batch
        self.diagnostics = diagnostics
        model.take_noise_from(examples.form.noise_source(examples))    # masks as a batch of the split's width draws

    def __call__(self, rows, lr, stop=False):
        """(the batch's mean loss, whether any rank asked to stop) after one step on the rows (B,) at lr."""
        X, Y, share = self.world.shard(*self.examples.batch(rows))
        if self.model.packs:                # a transformer computes only the positions that have a target
            X, Y = pack(X, Y, real_positions(Y))
        loss = forward_backward(self.model, self.criterion, X, Y, share)
        loss, agreed = self.world.all_reduce(self.model.grads, loss * share, stop)
        clip_and_update(self.model, self.optimizer, self.grad_clip, self.optimizer.next_numbers(lr), self.diagnostics)
        return loss, agreed
