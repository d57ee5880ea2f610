"""objective.py: the flow-matching direction (a model predicting noise - x0 has zero loss) and the batches (one shape
per batch, data.repeat). The dual masked terms: tests/test_dual_loss.py; collate with several references:
tests/test_multiref.py."""

import torch

import objective


def test_objective_direction():
    # x_t interpolates from data (t=0) to noise (t=1) and the target is the velocity noise - x0: a model that
    # predicts it exactly has zero loss, and the sign flip does not.
    x0, noise = torch.randn(2, 4, 64), torch.randn(2, 4, 64)

    class Oracle(torch.nn.Module):
        def forward(self, hidden_states, **kw):
            return (noise - x0,)

    args = dict(control=None, prompt_embeds=None, pooled_prompt_embeds=None, img_ids=None, text_ids=None,
                guidance=1.0)
    assert objective.flow_matching_loss(Oracle(), x0, noise, torch.rand(2), **args) == 0
    class Wrong(Oracle):
        def forward(self, hidden_states, **kw):
            return (x0 - noise,)
    assert objective.flow_matching_loss(Wrong(), x0, noise, torch.rand(2), **args) > 1


def test_repeat_each_sample_n_times_per_epoch():
    shapes = [(1,)] * 5 + [(2,)] * 3
    epoch = [objective.global_batch(shapes, 4, 0, i, repeat=3) for i in range(7)]  # ceil(15/4) + ceil(9/4) batches
    assert sorted(i for b in epoch for i in b) == sorted(list(range(8)) * 3)
    assert all(len({shapes[i] for i in b}) == 1 for b in epoch)  # one shape per batch, as without repeat
    assert [len(b) for b in epoch if shapes[b[0]] == (1,)].count(4) == 3  # 15 = 3 x 4 + 3: one partial, not three
    assert [objective.global_batch(shapes, 4, 0, i) for i in range(3)] == objective.make_batches(shapes, 4, 0, 0)
